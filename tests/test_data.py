import gzip
import hashlib

import pytest
import torch

from dnsconvert.data import load_mnist, read_idx, resolve_data, synthetic_digits
from dnsconvert.errors import DataError


@pytest.mark.mnist
def test_real_mnist_loads_with_published_checksums(mnist_path):
    data = load_mnist(mnist_path)
    assert data.train.images.shape == (60000, 1, 28, 28) and data.test.images.shape == (10000, 1, 28, 28)
    assert int(data.train.labels.max()) == 9
    raw = gzip.decompress((mnist_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "2646ac647ad5339dbf082846283269ea"
    x, y = data.train.batch(torch.arange(64))
    assert x.shape == (64, 1, 28, 28) and abs(float(data.train.batch(torch.arange(10000))[0].mean())) < 0.1


@pytest.mark.mnist
def test_dns_learns_real_mnist_quickly(mnist_path):
    from dnsconvert.models import builtin_spec
    from dnsconvert.surgery import DNSConfig, PruneConfig, prune

    config = PruneConfig(builtin_spec("lenet300100"), dns=DNSConfig(target_sparsity=0.9, gamma=1e-3), epochs=0.3, lr=0.05, checkpoint_every=0)
    result = prune(config, data=load_mnist(mnist_path), progress=False)
    assert result.test_accuracy > 0.85 and result.sparsity > 0.85


def test_synthetic_is_deterministic_and_mnist_shaped():
    a, b = synthetic_digits(200, 50, seed=3), synthetic_digits(200, 50, seed=3)
    assert torch.equal(a.train.images, b.train.images) and a.train.images.shape == (200, 1, 28, 28)
    assert set(a.train.labels.tolist()) <= set(range(10))


def test_bad_data_inputs(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_mnist(tmp_path / "nope")
    with pytest.raises(DataError, match="missing"):
        load_mnist(tmp_path)
    (tmp_path / "x.idx").write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "x.idx")
    (tmp_path / "y.idx").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(DataError):
        read_idx(tmp_path / "y.idx")


def test_resolve_prefers_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DNSCONVERT_MNIST", str(tmp_path))
    with pytest.raises(DataError, match="missing"):
        resolve_data("auto")
    assert resolve_data("synthetic").source.startswith("synthetic")


@pytest.mark.slow
@pytest.mark.mnist
def test_full_lenet300100_dns_run(mnist_path):
    """The benchmark's LeNet-300-100 run (about 2 minutes on 2 cores); run with -m slow."""
    from dnsconvert.models import builtin_spec
    from dnsconvert.surgery import DNSConfig, PruneConfig, prune

    layers = {"1.weight": 0.975, "3.weight": 0.97, "5.weight": 0.92}
    config = PruneConfig(builtin_spec("lenet300100"), dns=DNSConfig(layer_sparsity=layers, reestimate=True, iter_stop=13_000), epochs=20, dense_epochs=4, checkpoint_every=0)
    result = prune(config, data=load_mnist(mnist_path), progress=False)
    assert result.compression > 40 and result.test_accuracy > 0.975


def test_idx_gzip_is_inflated_only_as_far_as_its_header_says(tmp_path):
    """A 3 MB gzip that inflates to 3 GiB behind a header of 60000 images is refused after
    inflating ~47 MB (what the header states), never the whole stream."""
    import sys

    from helpers import FIXTURES

    sys.path.insert(0, str(FIXTURES))
    from hostile import gzip_bomb, idx_bytes

    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip_bomb(idx_bytes([60000, 28, 28], b""), 3 << 30))
    assert path.stat().st_size < 4 << 20
    with pytest.raises(DataError, match="more data than its header"):
        read_idx(path)


def test_idx_header_sizes_are_held_to_the_limit_before_reading(tmp_path):
    from dnsconvert import limits

    path = tmp_path / "big.idx"
    path.write_bytes(b"\x00\x00\x08\x03" + (1000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)  # header only
    with limits.override(dense_bytes=1000), pytest.raises(limits.LimitExceeded, match="DNSCONVERT_MAX_DENSE_BYTES"):
        read_idx(path)
    with pytest.raises(DataError, match="ends after 0 of 784000 bytes"):
        read_idx(path)
