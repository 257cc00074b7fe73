"""Target discovery through the ``dnsconvert.targets`` entry-point group.

Built-in targets are registered in dnsconvert's own pyproject exactly as third-party plugins
register theirs. A plugin that fails to import or instantiate is listed with its error and
never breaks the host (as in simonw/llm's plugin loading).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import entry_points

from ..errors import TargetError
from .base import Target

GROUP = "dnsconvert.targets"
_registered: dict[str, type[Target]] = {}  # in-process registrations (tests, notebooks)


@dataclass
class TargetEntry:
    name: str
    origin: str
    target: Target | None
    error: str | None = None


def register_target(name: str, cls: type[Target]) -> None:
    """Register a target class in this process (a plugin would use an entry point instead)."""
    _registered[name] = cls
    refresh()


def unregister_target(name: str) -> None:
    _registered.pop(name, None)
    refresh()


def refresh() -> None:
    """Forget the discovered targets (after installing a plugin into a running process)."""
    discover.cache_clear()


@functools.cache
def discover() -> list[TargetEntry]:
    """Every target, from the entry points and in-process registrations: found once per process."""
    entries: dict[str, TargetEntry] = {}
    for ep in entry_points(group=GROUP):
        origin = f"{ep.dist.name if ep.dist else '?'} ({ep.value})"
        try:
            target = ep.load()()
            entries[ep.name] = TargetEntry(ep.name, origin, target)
        except Exception as exc:  # any failure of a plugin is reported, not raised
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            entries[ep.name] = TargetEntry(ep.name, origin, None, f"{type(exc).__name__}: {message}")
    for name, cls in _registered.items():
        try:
            entries[name] = TargetEntry(name, f"registered ({cls.__module__}.{cls.__qualname__})", cls())
        except Exception as exc:
            entries[name] = TargetEntry(name, "registered", None, f"{type(exc).__name__}: {exc}")
    return sorted(entries.values(), key=lambda e: e.name)


def list_targets() -> list[TargetEntry]:
    return list(discover())


def get_target(name: str, *, require_available: bool = True) -> Target:
    entries = {e.name: e for e in discover()}
    entry = entries.get(name)
    if entry is None:
        raise TargetError(f"unknown target {name!r}", hint=f"available: {', '.join(entries) or 'none'}; see dnsconvert targets")
    if entry.target is None:
        raise TargetError(f"target {name!r} failed to load: {entry.error}", hint="reinstall the plugin that provides it")
    if require_available:
        entry.target.require_available()
    return entry.target
