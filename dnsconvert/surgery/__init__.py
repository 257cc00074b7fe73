"""The training stage: masks on a live model, Dynamic Network Surgery, criteria, baselines."""

from .baselines import imp_schedule, magnitude_masks
from .criteria import CRITERIA, make_criterion
from .dns import DNSConfig, DynamicNetworkSurgery, calibrate_c, update_probability
from .sparsifier import FixedMaskSparsifier, MaskedSparsifier, prunable_layers, prunable_parameters
from .train import PruneConfig, PruneResult, evaluate, prune

__all__ = [
    "CRITERIA",
    "DNSConfig",
    "DynamicNetworkSurgery",
    "FixedMaskSparsifier",
    "MaskedSparsifier",
    "PruneConfig",
    "PruneResult",
    "calibrate_c",
    "evaluate",
    "imp_schedule",
    "magnitude_masks",
    "make_criterion",
    "prunable_layers",
    "prunable_parameters",
    "prune",
    "update_probability",
]
