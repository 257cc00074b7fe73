import pytest
import torch

from dnsconvert.errors import PatternError
from dnsconvert.pattern import NMPattern, cannot_hold, complies, from_groups, nm_mask, to_groups, violating_groups


def test_parse_and_str():
    assert NMPattern.parse("2:4") == NMPattern(2, 4)
    assert NMPattern.parse(" 1 : 8 ") == NMPattern(1, 8)
    assert str(NMPattern(2, 4)) == "2:4"


@pytest.mark.parametrize("text", ["2-4", "4:2", "0:4", "2:2", "", "a:b"])
def test_parse_rejects(text):
    with pytest.raises(PatternError):
        NMPattern.parse(text)


def test_linear_groups_run_along_input_features():
    w = torch.arange(2 * 8).reshape(2, 8)
    groups = to_groups(w, 4)
    assert groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert torch.equal(from_groups(groups, w.shape), w)


def test_conv_groups_run_along_input_channels_per_kernel_position():
    w = torch.randn(3, 8, 2, 2)
    groups = to_groups(w, 4)
    # group 0 = output 0, kernel (0,0), input channels 0..3
    assert torch.equal(groups[0], w[0, 0:4, 0, 0])
    assert torch.equal(groups[1], w[0, 4:8, 0, 0])
    assert torch.equal(groups[2], w[0, 0:4, 0, 1])
    assert torch.equal(from_groups(groups, w.shape), w)


def test_nm_mask_keeps_top_n_and_respects_allowed():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    mask = nm_mask(scores, NMPattern(2, 4))
    assert mask.tolist() == [[True, True, False, False, False, False, True, True]]
    allowed = torch.tensor([[False, True, True, True, True, True, True, True]])
    mask = nm_mask(scores, NMPattern(2, 4), allowed=allowed)
    assert mask.tolist() == [[False, True, True, False, False, False, True, True]]
    sparse_allowed = torch.tensor([[True, False, False, False, True, True, True, True]])
    mask = nm_mask(scores, NMPattern(2, 4), allowed=sparse_allowed)
    assert mask[0, :4].tolist() == [True, False, False, False]  # never revives


def test_complies_and_violations():
    good = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]])
    bad = torch.tensor([[1, 1, 1, 0, 0, 1, 0, 1]])
    assert complies(good, NMPattern(2, 4))
    assert not complies(bad, NMPattern(2, 4))
    assert violating_groups(bad, NMPattern(2, 4)) == 1
    # a mask that is 2:4 along the *output* axis only is not compliant along the input axis
    transposed = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert complies(transposed.T, NMPattern(2, 4))
    assert not complies(transposed, NMPattern(2, 4))


def test_cannot_hold():
    assert cannot_hold((10, 8), NMPattern(2, 4)) is None
    assert "not a multiple" in cannot_hold((10, 6), NMPattern(2, 4))
    assert "not a multiple" in cannot_hold((20, 1, 5, 5), NMPattern(2, 4))
    assert "no reduction axis" in cannot_hold((10,), NMPattern(2, 4))
