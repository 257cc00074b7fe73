"""The public API names resolve to what they say, even after every submodule is imported."""

import importlib
import types

import dnsconvert


def test_public_names_are_not_shadowed_by_submodules():
    for module in ("checkpoint", "validate", "project", "export", "bench", "targets", "surgery", "pipeline", "models"):
        importlib.import_module(f"dnsconvert.{module}")
    for name in dnsconvert.__all__:
        if name == "__version__":
            continue
        value = getattr(dnsconvert, name)
        assert not isinstance(value, types.ModuleType), f"dnsconvert.{name} is a module"
