import json
import subprocess
import sys

import pytest

from helpers import BROKEN, FIXTURES, save_torch_pruned_lenet5
from dnsconvert.cli.main import COMMANDS, cli

# Each of these must end in exit code 2 with exactly one line on stderr, and no traceback
# (the broken fixtures fixtures/make_fixtures.py declares as unusable).
sys.path.insert(0, str(FIXTURES))
from make_fixtures import EXPECTED_EXIT  # noqa: E402

MALFORMED = sorted(name for name, code in EXPECTED_EXIT.items() if code == 2)


def one_line_error(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("name", MALFORMED)
@pytest.mark.parametrize("command", ["validate", "project"])
def test_malformed_input_exit_2_one_line(run_cli, tmp_path, name, command):
    args = [command, BROKEN / name] + (["-o", tmp_path / "out.safetensors"] if command == "project" else [])
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert str(BROKEN / name) in line or name in line
    assert not (tmp_path / "out.safetensors").exists()
    assert list(tmp_path.iterdir()) == []  # no partial file either


def test_missing_file_and_directory(run_cli, tmp_path):
    for path in (tmp_path / "nope.safetensors", tmp_path):
        result = run_cli("validate", path)
        assert result.exit_code == 2
        assert str(path) in one_line_error(result)


def test_debug_shows_traceback(run_cli):
    result = run_cli("--debug", "validate", BROKEN / "empty.safetensors")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


@pytest.mark.parametrize("name", ["rule_nonbinary_mask.pt", "rule_masked_nonzero.safetensors"])
def test_rule_failure_exit_1(run_cli, name):
    result = run_cli("validate", BROKEN / name)
    assert result.exit_code == 1


def test_validate_gates(run_cli):
    unstructured = FIXTURES / "tiny_convnet_magnitude90.safetensors"
    assert run_cli("validate", unstructured).exit_code == 0
    assert run_cli("validate", unstructured, "--require-nm", "2:4").exit_code == 1
    assert run_cli("validate", unstructured, "--min-sparsity", "0.95").exit_code == 1
    assert run_cli("validate", unstructured, "--require-nm", "2-4").exit_code == 2
    result = run_cli("validate", FIXTURES / "tiny_mlp_2to4.safetensors", "--require-nm", "2:4", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["passed"] is True


def test_project_then_validate_clean(run_cli, tmp_path):
    out = tmp_path / "p.safetensors"
    report = tmp_path / "r.json"
    result = run_cli("project", FIXTURES / "tiny_convnet_magnitude90.safetensors", "--nm", "2:4", "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["pattern"] == "2:4"
    assert run_cli("validate", out, "--require-nm", "2:4").exit_code == 0


def test_validate_and_project_torch_prune_state_dict(run_cli, tmp_path):
    save_torch_pruned_lenet5(tmp_path / "lenet5.pt", 0.8)
    result = run_cli("validate", tmp_path / "lenet5.pt", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert {layer["name"] for layer in data["layers"]} == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert data["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert {layer["source"] for layer in data["layers"]} == {"shape"}  # no model: kinds are guessed, and labelled so
    out = tmp_path / "p.safetensors"
    refused = run_cli("project", tmp_path / "lenet5.pt", "-o", out)  # guessed kinds are not projected
    assert refused.exit_code == 2 and "guessed from their shape" in refused.stderr and not out.exists()
    assert run_cli("project", tmp_path / "lenet5.pt", "--model", "lenet5", "-o", out).exit_code == 0
    result = run_cli("validate", out, "--require-nm", "2:4", "--json")
    assert result.exit_code == 0
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert "not a multiple of 4" in layers["conv1.weight"]["nm_skipped_reason"]  # one input channel
    assert {layer["source"] for layer in layers.values()} == {"module"}


def test_inspect(run_cli):
    result = run_cli("inspect", FIXTURES / "tiny_mlp_unstructured.safetensors")
    assert result.exit_code == 0
    assert "dnsconvert.models:mlp" in result.stdout


def test_every_command_has_help(run_cli):
    result = run_cli("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert cli.get_command(None, name) is not None, f"command {name!r}: its module {COMMANDS[name]} is missing"
        assert name in result.stdout, name
        result_cmd = run_cli(name, "--help")
        assert result_cmd.exit_code == 0 and "Usage:" in result_cmd.stdout, name


def test_help_test_would_catch_a_missing_command_module(monkeypatch):
    # the test above relies on get_command returning None for a module that is not there
    monkeypatch.setitem(COMMANDS, "ghost", "dnsconvert.cli.no_such_module:ghost_cmd")
    assert cli.get_command(None, "ghost") is None


def test_help_does_not_import_torch():
    code = "import sys\nfrom dnsconvert.cli import main\nsys.argv=['dnsconvert','--help']\ntry:\n main()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
