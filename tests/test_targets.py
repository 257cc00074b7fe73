"""Targets come from entry points; a fake plugin is found and selectable, a broken one is listed."""

import ast
import json
import textwrap
from pathlib import Path

import pytest

from dnsconvert.targets import get_target, list_targets, load_artifact, refresh


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """A real installed-distribution layout on sys.path: dist-info with entry_points.txt."""
    (tmp_path / "fake_target_plugin.py").write_text(textwrap.dedent('''
        from dnsconvert.plugin import Availability, Target, write_artifact

        class FakeTarget(Target):
            name = "fake"
            description = "a test double"
            option_help = {"greeting": "printed into the artifact"}

            def availability(self):
                return Availability(True, "always")

            def build(self, ckpt, output, options):
                greeting = options.extra.get("greeting", "hi").encode()
                files = {"sparse": ("greeting.txt", greeting)}
                return write_artifact(output, ckpt=ckpt, files=files, aliases={"dense": "sparse"}, target=self.name, format="text")
    '''))
    (tmp_path / "broken_target_plugin.py").write_text("raise ImportError('libnvinfer.so.10: cannot open shared object file')\n")
    dist = tmp_path / "fake_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[dnsconvert.targets]\nfake = fake_target_plugin:FakeTarget\nbroken = broken_target_plugin:Target\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh()  # targets are discovered once per process: look again now that the plugin exists
    yield tmp_path
    monkeypatch.undo()
    refresh()


def test_builtin_targets_come_from_entry_points():
    names = {entry.name: entry for entry in list_targets()}
    assert {"onnx", "ort"} <= set(names)
    assert "dnsconvert" in names["ort"].origin


def test_fake_plugin_listed_and_selectable(fake_plugins, run_cli):
    result = run_cli("targets", "--json")
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["fake"]["available"] is True
    assert rows["broken"]["available"] is False and "libnvinfer" in rows["broken"]["reason"]
    assert rows["ort"]["available"] is True  # the broken plugin did not break anything else
    out = fake_plugins / "out"
    result = run_cli("export", "fixtures/tiny_mlp_unstructured.safetensors", "--target", "fake", "-T", "greeting=hello", "-o", out)
    assert result.exit_code == 0, result.output
    assert load_artifact(out).read("sparse") == b"hello"


def test_broken_plugin_selected_is_a_clear_error(fake_plugins, run_cli):
    result = run_cli("export", "fixtures/tiny_mlp_unstructured.safetensors", "--target", "broken", "-o", fake_plugins / "x")
    assert result.exit_code == 2
    assert "failed to load" in result.stderr
    with pytest.raises(Exception, match="failed to load"):
        get_target("broken")


def test_plugin_removed_after_test():
    assert "fake" not in {entry.name for entry in list_targets()}


def test_plugins_import_only_the_plugin_surface():
    """Every dnsconvert import in a bundled plugin's package (at any depth: imports inside
    functions count) is a name of ``dnsconvert.plugin.__all__``."""
    import dnsconvert.plugin

    sources = sorted(Path(__file__).resolve().parent.parent.glob("plugins/*/src/**/*.py"))
    assert sources
    wrong = []
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                wrong += [f"{source.name}:{node.lineno} import {a.name}" for a in node.names if a.name.split(".")[0] == "dnsconvert"]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "dnsconvert":
                if node.module != "dnsconvert.plugin":
                    wrong.append(f"{source.name}:{node.lineno} from {node.module}")
                else:
                    wrong += [f"{source.name}:{node.lineno} {a.name}" for a in node.names if a.name not in dnsconvert.plugin.__all__]
    assert wrong == [], f"plugin imports outside dnsconvert.plugin: {wrong}"
