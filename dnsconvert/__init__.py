"""dnsconvert: Dynamic Network Surgery training to a measured, deployable sparse runtime.

The public API is imported lazily so that ``import dnsconvert`` (and ``dnsconvert --help``)
does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SparseCheckpoint": "dnsconvert.checkpoint",
    "ModelSpec": "dnsconvert.modelspec",
    "InputSpec": "dnsconvert.modelspec",
    "Dim": "dnsconvert.modelspec",
    "PruningInfo": "dnsconvert.checkpoint",
    "load_checkpoint": "dnsconvert.loading",
    "NMPattern": "dnsconvert.pattern",
    "SparsityReport": "dnsconvert.validate",
    "project_nm": "dnsconvert.project",
    "ProjectionResult": "dnsconvert.project",
    "build_model": "dnsconvert.models",
    "build_masked_model": "dnsconvert.models",
    "DynamicNetworkSurgery": "dnsconvert.surgery",
    "prune": "dnsconvert.surgery",
    "densify": "dnsconvert.export",
    "get_target": "dnsconvert.targets",
    "build_artifact": "dnsconvert.targets",
    "load_artifact": "dnsconvert.artifact",
    "Artifact": "dnsconvert.artifact",
    "list_targets": "dnsconvert.targets",
    "run_pipeline": "dnsconvert.pipeline",
}
# validate, export and bench share their modules' names (dnsconvert.validate.validate, ...):
# import them from those modules, since importing a submodule rebinds the package attribute.

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dnsconvert' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
