"""Targets (runtimes): the interface, the entry-point registry and the built-in targets."""

from .base import Artifact, Availability, BuildOptions, Runner, Target
from .registry import GROUP, TargetEntry, get_target, list_targets, register_target, unregister_target

__all__ = [
    "GROUP",
    "Artifact",
    "Availability",
    "BuildOptions",
    "Runner",
    "Target",
    "TargetEntry",
    "get_target",
    "list_targets",
    "register_target",
    "unregister_target",
]
