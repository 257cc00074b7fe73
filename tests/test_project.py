import torch

from helpers import FIXTURES
from dnsconvert.checkpoint import SparseCheckpoint
from dnsconvert.loading import load_checkpoint
from dnsconvert.pattern import NMPattern, complies
from dnsconvert.project import project_nm
from dnsconvert.validate import validate


def test_projection_validates_and_never_revives():
    ckpt = load_checkpoint(FIXTURES / "tiny_convnet_magnitude90.safetensors")
    result = project_nm(ckpt, "2:4")
    assert validate(result.checkpoint, require_nm="2:4").passed
    for name, mask in result.checkpoint.masks.items():
        assert not bool((mask & ~ckpt.masks[name]).any()), "a pruned weight came back"


def test_projection_keeps_largest_and_reports_cost():
    w = torch.tensor([[4.0, -3.0, 2.0, 1.0, 0.5, 0.1, 0.2, 0.3]])
    ckpt = SparseCheckpoint({"fc.weight": w}, {"fc.weight": torch.ones(1, 8, dtype=torch.bool)})
    result = project_nm(ckpt, NMPattern(2, 4), layers=["fc.weight"])
    assert result.checkpoint.masks["fc.weight"].tolist() == [[True, True, False, False, True, False, False, True]]
    layer = result.layers[0]
    assert layer.removed_weights == 4
    assert abs(layer.removed_magnitude_fraction - (2.0 + 1.0 + 0.1 + 0.2) / 11.1) < 1e-6
    assert layer.sparsity_after == 0.5


def test_projection_skips_layers_that_cannot_hold_with_reason():
    ckpt = SparseCheckpoint({"fc.weight": torch.ones(2, 6)}, {"fc.weight": torch.ones(2, 6, dtype=torch.bool)})
    result = project_nm(ckpt, "2:4", layers="fc.weight")
    assert result.layers[0].skipped_reason and "multiple of 4" in result.layers[0].skipped_reason
    assert torch.equal(result.checkpoint.masks["fc.weight"], ckpt.masks["fc.weight"])


def test_projection_uses_saliency_when_given():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    ckpt = SparseCheckpoint({"fc.weight": w}, {"fc.weight": torch.ones(1, 4, dtype=torch.bool)})
    result = project_nm(ckpt, "2:4", layers=["fc.*"], scores={"fc.weight": torch.tensor([[0.0, 0.0, 1.0, 1.0]])})
    assert result.checkpoint.masks["fc.weight"].tolist() == [[False, False, True, True]]


def test_projection_of_1_8_pattern():
    ckpt = load_checkpoint(FIXTURES / "tiny_mlp_unstructured.safetensors")
    result = project_nm(ckpt, "1:8")
    for mask in result.checkpoint.masks.values():
        assert complies(mask, NMPattern(1, 8))
