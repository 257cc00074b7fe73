"""Reuse the main test suite's fixtures (CLI runner, GPU skips) for the plugin's tests."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_dnsconvert_tests_conftest", Path(__file__).resolve().parents[3] / "tests" / "conftest.py")
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)

run_cli = _root.run_cli
pytest_collection_modifyitems = _root.pytest_collection_modifyitems
