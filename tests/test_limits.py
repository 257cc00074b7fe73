"""dnsconvert.limits: defaults, raising a limit (environment or API), and what the message says."""

import sys

import pytest

from helpers import FIXTURES
from dnsconvert import limits
from dnsconvert.errors import UserError

sys.path.insert(0, str(FIXTURES))
from hostile import onnx_file  # noqa: E402


def test_defaults_and_environment(monkeypatch):
    for limit in limits.LIMITS.values():
        monkeypatch.delenv(limit.env, raising=False)
        assert limits.get(limit.name) == limit.default
    monkeypatch.setenv("DNSCONVERT_MAX_DENSE_BYTES", "2G")
    assert limits.get("dense_bytes") == 2 << 30
    monkeypatch.setenv("DNSCONVERT_MAX_DENSE_BYTES", "512MiB")
    assert limits.get("dense_bytes") == 512 << 20
    monkeypatch.setenv("DNSCONVERT_MAX_DEPTH", "lots")
    with pytest.raises(UserError, match="DNSCONVERT_MAX_DEPTH='lots' is not a number"):
        limits.get("depth")


def test_override_is_scoped():
    before = limits.get("layers")
    with limits.override(layers=3):
        assert limits.get("layers") == 3
        with pytest.raises(limits.LimitExceeded, match="over the limit of 3 layers") as caught:
            limits.check("layers", 4, "a model", path="m.safetensors")
    assert limits.get("layers") == before
    message = str(caught.value)
    assert message.startswith("m.safetensors: a model needs 4 layers") and "DNSCONVERT_MAX_LAYERS=4" in message
    with pytest.raises(KeyError):
        with limits.override(nonsense=1):
            pass


def test_raising_the_limit_lets_a_trusted_file_through(run_cli, tmp_path, monkeypatch):
    # a sparse W of 4 x 2^20 float32 (16 MiB dense): refused under a 1 MiB limit, fine when raised
    source = onnx_file(tmp_path / "m.onnx", indices=(1, 5), values=(1.0, 2.0), dims=(4, 1 << 20))
    monkeypatch.setenv("DNSCONVERT_MAX_DENSE_BYTES", "1M")
    result = run_cli("densify", source, "-o", tmp_path / "dense.onnx")
    assert result.exit_code == 2 and "DNSCONVERT_MAX_DENSE_BYTES=16M" in result.stderr
    assert not (tmp_path / "dense.onnx").exists()
    monkeypatch.setenv("DNSCONVERT_MAX_DENSE_BYTES", "16M")
    result = run_cli("densify", source, "-o", tmp_path / "dense.onnx")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "dense.onnx").stat().st_size > 16 << 20


def test_a_bad_limit_value_is_one_line(run_cli, monkeypatch):
    monkeypatch.setenv("DNSCONVERT_MAX_DEPTH", "deep")
    result = run_cli("validate", FIXTURES / "tiny_mlp_unstructured.safetensors")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "DNSCONVERT_MAX_DEPTH" in lines[0]


def test_help_lists_every_limit(run_cli):
    result = run_cli("--help")
    for limit in limits.LIMITS.values():
        assert limit.env in result.stdout
