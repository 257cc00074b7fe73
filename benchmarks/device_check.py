"""One-shot GPU check: everything this project can only test on a CUDA machine, in one run, one JSON.

    python benchmarks/device_check.py [--out runs/device_check.json] [--budget-s 450]

Steps (each one is run, or reported as skipped with its reason; the whole run stays inside
--budget-s, 7.5 minutes by default):

1. environment: python, torch, CUDA device and compute capability, cuSPARSELt, tensorrt, trtexec;
2. install: ``pip install --no-deps --no-index -e . -e plugins/dnsconvert-tensorrt`` from this
   working tree when dnsconvert is not already importable from it (offline: the machine's
   torch and packages are used as they are; missing dependencies are named);
3. the ``gpu``-marked tests (``pytest -m gpu``);
4. ``benchmarks/gpu_2to4.py``: 2:4 vs dense GEMM at batch 1/64/1024 in fp16 and bf16 on every
   backend the GPU supports, and the FFN end to end;
5. the TensorRT build (dense + sparse engines of a 2:4 FFN, fp16) when ``import tensorrt``
   works: the plan that ran (10.x flags or 11.x typed ONNX), sparse layers, parity.

Exit 0 when every step ran or was skipped for a reason, 1 when a step failed.

On this workplace's lent H100/H200 machines (Python 3.12, torch with CUDA and cuSPARSELt, no
package index, no pydantic, no TensorRT), from the checkout the device tool sends:

    # here, once: the missing wheels into .whl/ (git-ignored)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic_core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    # there (device run, carry [".whl"], timeout 560 s):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/device_check.py --out $OUT/device_check.json --budget-s 430
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def _run(command: list[str], timeout: float) -> dict:
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s", "tail": (exc.stdout or "")[-2000:] if isinstance(exc.stdout, str) else ""}
    tail = (done.stdout + done.stderr)[-3000:]
    return {"returncode": done.returncode, "seconds": round(time.monotonic() - started, 1), "tail": tail}


def environment() -> dict:
    env: dict = {"python": platform.python_version(), "platform": platform.platform(), "cuda_available": False}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = bool(torch.cuda.is_available())
        if env["cuda_available"]:
            env["device"] = torch.cuda.get_device_name()
            env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
            env["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    except ImportError as exc:
        env["torch"] = f"not importable ({exc})"
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except Exception as exc:  # ImportError, or a broken install that fails on load
        env["tensorrt"] = None
        env["tensorrt_import_error"] = f"{type(exc).__name__}: {exc}"
    env["trtexec"] = shutil.which("trtexec")
    return env


REQUIRED = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "click", "safetensors", "rich", "pydantic", "numba", "pytest")


def install(budget: Budget) -> dict:
    """Editable installs of this tree, offline (GPU machines may reach no package index): no
    dependency resolution, no build isolation; the dependencies must already be importable."""
    spec = importlib.util.find_spec("dnsconvert")
    here = spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(ROOT)
    plugin = importlib.util.find_spec("dnsconvert_tensorrt") is not None
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if here and plugin:
        return {"status": "skipped", "reason": f"dnsconvert and the TensorRT plugin are already importable from this tree ({Path(spec.origin).parent})", "missing": missing}
    if missing:
        return {"status": "failed", "reason": f"missing dependencies (carry them as wheels): {', '.join(missing)}"}
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", ".", "-e", "plugins/dnsconvert-tensorrt"]
    result = _run(command, timeout=min(240, budget.left()))
    importlib.invalidate_caches()
    result["status"] = "ok" if result.get("returncode") == 0 else "failed"
    return result


def gpu_tests(env: dict, budget: Budget) -> dict:
    if not env["cuda_available"]:
        return {"status": "skipped", "reason": "no CUDA GPU: the gpu-marked tests need one"}
    result = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], timeout=min(180, budget.left()))
    lines = [line for line in result.get("tail", "").splitlines() if " passed" in line or " failed" in line or " skipped" in line or "error" in line]
    result["summary"] = lines[-1] if lines else None
    result["status"] = "ok" if result.get("returncode") == 0 else "failed"
    return result


def gpu_2to4(env: dict, budget: Budget) -> dict:
    if not env["cuda_available"]:
        return {"status": "skipped", "reason": "no CUDA GPU: 2:4 semi-structured kernels need one (compute capability 8.0+)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gpu_2to4.json"
        result = _run([sys.executable, "benchmarks/gpu_2to4.py", "--dtypes", "fp16", "bf16", "--backend", "all", "--iterations", "50", "--json", str(out)], timeout=min(240, budget.left()))
        if out.exists():
            result["numbers"] = json.loads(out.read_text())
    result["status"] = "ok" if result.get("returncode") == 0 else "failed"
    return result


def tensorrt_build(env: dict, budget: Budget) -> dict:
    if not env["cuda_available"]:
        return {"status": "skipped", "reason": "no CUDA GPU: TensorRT builds engines on one"}
    if env.get("tensorrt") is None:
        return {"status": "skipped", "reason": f"import tensorrt failed ({env.get('tensorrt_import_error')})"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trt.json"
        result = _run([sys.executable, str(Path(__file__).resolve()), "--trt-step", str(out)], timeout=min(240, budget.left()))
        if out.exists():
            result["numbers"] = json.loads(out.read_text())
    result["status"] = "ok" if result.get("returncode") == 0 else "failed"
    return result


def trt_step(out: Path) -> None:
    """Build dense + sparse engines of a 2:4 FFN in fp16 (run in a child process, under a timeout)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import masked_checkpoint

    from dnsconvert.project import project_nm
    from dnsconvert.targets import BuildOptions, get_target

    ckpt = project_nm(masked_checkpoint("transformer_mlp", 0.5, dim=1024, hidden=4096, depth=1), "2:4").checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        artifact = get_target("trt").build(ckpt, Path(tmp) / "ffn", BuildOptions(extra={"precision": "fp16"}))
        m = artifact.manifest.details
        out.write_text(json.dumps({
            "build_seconds": time.monotonic() - started, "tensorrt_api": m["tensorrt_api"], "builder": m["builder"], "sparse_layers": m["sparse_layers"],
            "sparsity": m["sparsity"], "timing_cache": m["timing_cache"], "parity_vs_ort": artifact.manifest.parity.to_json(),
            "inspector_schema": m["inspector_schema"],
        }, indent=2, default=str))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "device_check.json")
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--trt-step", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trt_step:
        trt_step(args.trt_step)
        return
    started = time.monotonic()
    budget = Budget(args.budget_s)
    report: dict = {"kind": "device-check", "version": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}
    report["environment"] = env = environment()
    steps = [("install", lambda: install(budget)), ("gpu_tests", lambda: gpu_tests(env, budget)), ("gpu_2to4", lambda: gpu_2to4(env, budget)), ("tensorrt_build", lambda: tensorrt_build(env, budget))]
    for name, step in steps:
        if budget.left() < 5:
            report["steps"][name] = {"status": "skipped", "reason": "the time budget was spent"}
        else:
            try:
                report["steps"][name] = step()
            except Exception as exc:  # a step's own bug must not lose the other steps' numbers
                report["steps"][name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        print(f"{name:15s} {report['steps'][name]['status']:8s} {report['steps'][name].get('reason', report['steps'][name].get('summary', ''))}", flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.out)
    print(f"device: {env.get('device', 'none')}; wrote {args.out} in {report['seconds']} s")
    sys.exit(1 if any(step["status"] == "failed" for step in report["steps"].values()) else 0)


if __name__ == "__main__":
    main()
