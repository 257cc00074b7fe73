import pytest
import torch

from helpers import BROKEN, FIXTURES
from dnsconvert.checkpoint import SparseCheckpoint
from dnsconvert.loading import load_checkpoint
from dnsconvert.errors import CheckpointError, ModelSpecError
from dnsconvert.validate import validate


def ckpt_with(weight, mask):
    return SparseCheckpoint({"fc.weight": weight}, {"fc.weight": mask})


def rules(report):
    return {v.rule for v in report.violations}


def test_clean_checkpoint_passes():
    report = validate(load_checkpoint(FIXTURES / "tiny_mlp_unstructured.safetensors"))
    assert report.passed
    assert report.sparsity == pytest.approx(0.75, abs=0.01)
    assert [layer.name for layer in report.layers] == ["1.weight", "3.weight", "5.weight"]


def test_rule_mask_binary():
    w = torch.ones(2, 4)
    assert "mask-binary" in rules(validate(ckpt_with(w, torch.tensor([[1.0, 0.5, 1, 1], [1, 1, 1, 1]]))))
    assert "mask-binary" in rules(validate(load_checkpoint(BROKEN / "rule_nonbinary_mask.pt")))


def test_rule_masked_weights_are_zero():
    w = torch.ones(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert rules(validate(ckpt_with(w, mask))) == {"masked-zero"}
    assert rules(validate(ckpt_with(w * mask, mask))) == set()
    assert "masked-zero" in rules(validate(load_checkpoint(BROKEN / "rule_masked_nonzero.safetensors")))


def test_rule_mask_shape_is_unusable():
    with pytest.raises(CheckpointError, match="shape"):
        ckpt_with(torch.ones(2, 4), torch.ones(4, 2, dtype=torch.bool))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rule_finite_is_unusable(bad):
    w = torch.ones(2, 4)
    w[0, 0] = bad
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        validate(ckpt_with(w, torch.ones(2, 4, dtype=torch.bool)))


def test_rule_nm_along_reduction_axis():
    # 2:4 along rows of the [out, in] weight holds; along columns it would not.
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 0], [0, 0, 1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    report = validate(ckpt_with(mask.float(), mask), require_nm="2:4")
    assert report.passed and report.layers[0].nm_compliant and report.layers[0].eligible_2_4
    # 2:4 along the output axis (columns) but not along the input axis: a violation
    column_wise = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    report = validate(ckpt_with(column_wise.float(), column_wise), require_nm="2:4")
    assert rules(report) == {"nm"}
    assert not report.layers[0].eligible_2_4


def test_nm_conv_checked_per_kernel_position():
    mask = torch.zeros(2, 4, 3, 3, dtype=torch.bool)
    mask[:, :2] = True  # 2 of 4 input channels at each kernel position
    assert validate(SparseCheckpoint({"c.weight": mask.float()}, {"c.weight": mask}), require_nm="2:4").passed
    mask[0, 2, 1, 1] = True
    report = validate(SparseCheckpoint({"c.weight": mask.float()}, {"c.weight": mask}), require_nm="2:4")
    assert rules(report) == {"nm"} and "1 group" in report.violations[0].message


def test_eligible_reported_apart_from_violations():
    report = validate(load_checkpoint(FIXTURES / "tiny_convnet_magnitude90.safetensors"))
    assert report.passed  # nothing required, so no violations
    eligible = {layer.name: layer.eligible_2_4 for layer in report.layers}
    assert eligible == {"0.weight": True, "3.weight": False, "8.weight": True}
    report = validate(load_checkpoint(FIXTURES / "tiny_convnet_magnitude90.safetensors"), require_nm="2:4")
    assert [v.layer for v in report.violations] == ["3.weight"]


def test_layer_that_cannot_hold_pattern_is_skipped_not_violating():
    w = torch.ones(4, 6)
    report = validate(ckpt_with(w, torch.ones(4, 6, dtype=torch.bool)), require_nm="2:4")
    assert report.passed
    assert "not a multiple" in report.layers[0].nm_skipped_reason


def test_rule_min_sparsity():
    ckpt = load_checkpoint(FIXTURES / "tiny_mlp_unstructured.safetensors")
    assert validate(ckpt, min_sparsity=0.7).passed
    assert rules(validate(ckpt, min_sparsity=0.9)) == {"min-sparsity"}


def test_rule_unknown_layer_for_builtin_model():
    with pytest.raises(ModelSpecError, match="unknown layer"):
        validate(load_checkpoint(BROKEN / "unknown_layer.safetensors"))


def test_report_json_is_machine_readable():
    data = validate(load_checkpoint(FIXTURES / "tiny_mlp_2to4.safetensors"), require_nm="2:4").to_json()
    assert data["passed"] and data["require_nm"] == "2:4"
    assert data["eligible_2_4"] == ["1.weight", "3.weight", "5.weight"]
