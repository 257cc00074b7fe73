import pytest
import torch
from torch.nn.utils import prune

from helpers import BROKEN, FIXTURES
from dnsconvert.checkpoint import PruningInfo, SparseCheckpoint
from dnsconvert.loading import load_checkpoint
from dnsconvert.modelspec import ModelSpec
from dnsconvert.errors import CheckpointError
from dnsconvert.models import lenet300100


def make_ckpt():
    weights = {"a.weight": torch.randn(4, 8), "a.bias": torch.randn(4)}
    masks = {"a.weight": torch.rand(4, 8) > 0.5}
    return SparseCheckpoint(
        weights,
        masks,
        model=ModelSpec("dnsconvert.models:mlp", {"in_features": 8, "hidden": [4]}, (1, 8)),
        pruning=PruningInfo("dns", "magnitude", None, {"c": 3.0}),
        state={"iteration": 7, "mu": {"a.weight": 0.5}, "raw": {"a.weight": torch.randn(4, 8)}, "opt": {0: {"step": torch.tensor(3.0)}}},
    )


def test_round_trip_keeps_everything(tmp_path):
    ckpt = make_ckpt()
    path = ckpt.save(tmp_path / "c.safetensors")
    back = load_checkpoint(path)
    assert back.model == ckpt.model
    assert back.pruning == ckpt.pruning
    assert torch.equal(back.masks["a.weight"], ckpt.masks["a.weight"])
    assert torch.equal(back.weights["a.weight"], ckpt.masked_weights()["a.weight"])
    assert back.state["iteration"] == 7
    assert torch.equal(back.state["raw"]["a.weight"], ckpt.state["raw"]["a.weight"])
    assert torch.equal(back.state["opt"][0]["step"], torch.tensor(3.0))
    assert back.source == path


def test_saved_weights_are_zero_where_masked(tmp_path):
    ckpt = make_ckpt()
    back = load_checkpoint(ckpt.save(tmp_path / "c.safetensors"))
    assert not bool((back.weights["a.weight"][~back.masks["a.weight"]]).any())


def test_failed_save_leaves_no_file(tmp_path):
    ckpt = make_ckpt()
    ckpt.state = {"bad": object()}
    with pytest.raises(TypeError):
        ckpt.save(tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_torch_prune_state_dict_imports_masks(tmp_path):
    torch.manual_seed(0)
    model = lenet300100()
    prune.l1_unstructured(model[1], "weight", amount=0.9)
    prune.random_unstructured(model[3], "weight", amount=0.5)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert set(ckpt.masks) == {"1.weight", "3.weight"}
    assert "1.weight_orig" not in ckpt.weights
    assert torch.equal(ckpt.weights["1.weight"], model[1].weight.detach())
    assert ckpt.pruning.method == "torch.nn.utils.prune"


def test_dense_state_dict_masks_from_exact_zeros():
    ckpt = load_checkpoint(FIXTURES / "tiny_mlp_dense.pt")
    assert set(ckpt.masks) == {"1.weight", "3.weight", "5.weight"}
    assert not bool(ckpt.masks["1.weight"][:, :4].any())
    assert bool(ckpt.masks["3.weight"].all())


def test_plain_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.tensor([[0.0, 1.0], [2.0, 0.0]])}, str(tmp_path / "s.safetensors"))
    ckpt = load_checkpoint(tmp_path / "s.safetensors")
    assert ckpt.masks["fc.weight"].tolist() == [[False, True], [True, False]]


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (marker.touch, ())

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"w": Evil()}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_structure_errors():
    with pytest.raises(CheckpointError, match="names no weight"):
        SparseCheckpoint({"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="shape"):
        SparseCheckpoint({"a": torch.zeros(2, 2)}, {"a": torch.zeros(2)})


def broken_expectations() -> dict[str, int]:
    import sys

    sys.path.insert(0, str(FIXTURES))
    from make_fixtures import EXPECTED_EXIT

    return EXPECTED_EXIT


def test_broken_fixtures_are_exactly_the_declared_ones():
    # fixtures/make_fixtures.py declares each broken file with what validate must answer; a file
    # missing, extra or renamed fails here (regenerate with: python fixtures/make_fixtures.py)
    assert sorted(p.name for p in BROKEN.iterdir()) == sorted(broken_expectations())


@pytest.mark.parametrize("name", sorted(broken_expectations()))
def test_each_broken_fixture_gives_its_declared_exit_code(run_cli, name):
    result = run_cli("validate", BROKEN / name)
    assert result.exit_code == broken_expectations()[name], result.output
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and str(BROKEN / name) in lines[0] and "Traceback" not in result.output


def test_safetensors_metadata_one_reader_for_files_and_bytes():
    """The one safetensors metadata reader (checkpoints on disk, artifact files in memory)
    bounds the header by the bytes present and names the file it refuses."""
    from safetensors.torch import save

    from dnsconvert.loading import safetensors_metadata

    path = FIXTURES / "tiny_mlp_2to4.safetensors"
    assert set(safetensors_metadata(path)) == {"dnsconvert"}
    assert safetensors_metadata(path.read_bytes()) == safetensors_metadata(path)
    assert safetensors_metadata(save({"w": torch.zeros(2)})) == {}
    for bad, message in [
        (b"\x05", "header length 0 does not fit in its 1 bytes"),
        ((10**9).to_bytes(8, "little") + b"{}", "header length 1,000,000,000 does not fit"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        ((21).to_bytes(8, "little") + b'{"__metadata__": [1]}', "not an object of strings"),
        ((4).to_bytes(8, "little") + b"[" * 4, "not valid JSON"),
    ]:
        with pytest.raises(CheckpointError, match=message) as refused:
            safetensors_metadata(bad, path="model.safetensors")
        assert refused.value.path == "model.safetensors"
