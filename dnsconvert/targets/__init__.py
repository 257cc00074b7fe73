"""Targets (runtimes): the interface, the entry-point registry, the one build path and the
built-in targets."""

from ..artifact import Artifact, load_artifact
from .base import Availability, BuildOptions, Runner, Target, option_bool, option_number
from .build import build_artifact, resolve_target
from .registry import GROUP, TargetEntry, get_target, list_targets, refresh, register_target, unregister_target

__all__ = [
    "GROUP",
    "Artifact",
    "Availability",
    "BuildOptions",
    "Runner",
    "Target",
    "TargetEntry",
    "build_artifact",
    "get_target",
    "list_targets",
    "load_artifact",
    "option_bool",
    "option_number",
    "refresh",
    "register_target",
    "resolve_target",
    "unregister_target",
]
