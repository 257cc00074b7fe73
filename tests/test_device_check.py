"""benchmarks/device_check.py runs end to end without a GPU: every GPU step skipped with its reason, exit 0."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check really runs (minutes); run it by hand")
def test_device_check_without_gpu(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert set(steps) == {"install", "gpu_tests", "gpu_2to4", "tensorrt_build"}
    for name in ("gpu_tests", "gpu_2to4", "tensorrt_build"):
        assert steps[name]["status"] == "skipped" and "GPU" in steps[name]["reason"]
    assert report["environment"]["cuda_available"] is False and report["environment"]["torch"] == torch.__version__
