"""The ``trt`` target: a dense and a sparse-weights TensorRT engine with identical settings.

Works with TensorRT 10.x and 11.x (``tensorrt>=10,<12``): :mod:`.api` detects which surface
the installed module (or ``trtexec``) has and plans the build -- precision flags on an fp32
ONNX where weak typing exists, a typed ONNX (fp16/bf16 casts, INT8 Q/DQ) from
:mod:`dnsconvert.export.precision` otherwise. The manifest records the features, the plan
that ran, the timing-cache outcome and, per checkpoint layer, what TensorRT did and on what
evidence (inspector fields first, builder log second).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx

from . import PINNED_TENSORRT
from .api import BuildPlan, TrtFeatures, detect, plan_build
from .compat import check_engine_compat, current_setup
from .core import (
    Artifact, Availability, BuildOptions, GateFailed, Target, atomic_path, build_onnx_artifact, load_calibration,
    manifest_helpers, parity_inputs, precision_tolerances, reference_runner, write_json_atomic,
)  # fmt: skip
from .eligibility import layer_eligibility
from .logparse import parse_engine_info
from .report import node_to_param, sparsity_record
from .settings import OPTION_HELP, BuildSettings
from .trtexec import find_trtexec, probe_trtexec, run_trtexec, trtexec_command


def _has_gpu() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not importable"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    return True, torch.cuda.get_device_name()


def engine_tolerance(plan: BuildPlan, atol: float, rtol: float) -> tuple[float, float, bool]:
    """(atol, rtol, range_relative) of the engine-vs-ONNX-Runtime parity for this plan."""
    tolerances, int8_range = precision_tolerances()
    if plan.precision == "int8":
        return 0.0, int8_range, True
    if plan.precision == "fp32":
        return atol, rtol, False
    if plan.onnx_precision in tolerances and plan.onnx_precision != "fp32":  # typed ONNX: same dtype on both sides
        a, r = tolerances[plan.onnx_precision]
        return max(atol, a), max(rtol, r), False
    loose = {"fp16": 1e-2, "tf32": 1e-2, "bf16": 5e-2}[plan.precision]  # reduced precision in TensorRT vs an fp32 reference
    return max(atol, loose), max(rtol, loose), False


def engine_parity(reference, candidate, inputs, atol: float, rtol: float, range_relative: bool) -> dict:
    max_abs, scale, passed = 0.0, 0.0, True
    for x in inputs:
        ref, got = np.asarray(reference(x), np.float64), np.asarray(candidate(x), np.float64)
        if ref.shape != got.shape:
            return {"passed": False, "max_abs": float("inf"), "reason": f"shape {got.shape} vs {ref.shape}"}
        diff = np.abs(got - ref)
        max_abs, scale = max(max_abs, float(diff.max(initial=0))), max(scale, float(np.abs(ref).max(initial=0)))
        if not range_relative:
            passed &= bool(np.all(diff <= atol + rtol * np.abs(ref)))
    if range_relative:
        passed = max_abs <= rtol * max(scale, 1e-12)
    return {"passed": passed, "max_abs": max_abs, "max_rel_to_range": max_abs / max(scale, 1e-12), "atol": atol, "rtol": rtol, "range_relative": range_relative}


class TensorRTTarget(Target):
    name: ClassVar[str] = "trt"
    description: ClassVar[str] = f"TensorRT engine with BuilderFlag.SPARSE_WEIGHTS (TensorRT {PINNED_TENSORRT}, 10.x and 11.x)"
    suffix: ClassVar[str] = ".engine"
    exploits_sparsity: ClassVar[str] = "yes where TensorRT picks a sparse tactic (2:4 layers, fp16/bf16/tf32/int8)"
    option_help: ClassVar[dict[str, str]] = OPTION_HELP

    def availability(self) -> Availability:
        has_api = importlib.util.find_spec("tensorrt") is not None
        trtexec = find_trtexec()
        if not has_api and not trtexec:
            return Availability(False, f"neither the tensorrt Python package ({PINNED_TENSORRT}) nor trtexec is installed")
        gpu, detail = _has_gpu()
        if not gpu:
            return Availability(False, f"TensorRT needs an NVIDIA GPU: {detail}")
        return Availability(True, f"{'Python API' if has_api else 'trtexec'} on {detail}")

    def features(self, settings: BuildSettings) -> tuple[TrtFeatures, bool]:
        """(what this TensorRT offers, whether trtexec builds)."""
        use_trtexec = settings.use_trtexec or importlib.util.find_spec("tensorrt") is None
        if use_trtexec:
            return probe_trtexec(find_trtexec() or "trtexec"), True
        import tensorrt as trt

        return detect(trt), False

    def build(self, ckpt, output: Path, options: BuildOptions) -> Artifact:
        self.check_options(options.extra)
        self.require_available()
        settings = BuildSettings.from_options(options.extra, output.with_suffix(".timing-cache"))
        features, use_trtexec = self.features(settings)
        plan = plan_build(settings.precision, features, settings.typing)
        return self.build_with(ckpt, output, options, settings, features, plan, use_trtexec)

    def build_with(self, ckpt, output: Path, options: BuildOptions, settings: BuildSettings, features: TrtFeatures, plan: BuildPlan, use_trtexec: bool, trt=None) -> Artifact:
        """The build once the TensorRT surface and plan are known (``trt``: a module to use instead of the installed one)."""
        base_manifest, file_record, manifest_path_for = manifest_helpers()
        calibration = load_calibration(settings.calibration, ckpt.model.input_shape, samples=settings.calibration_samples) if plan.onnx_precision == "int8" else None
        onnx_path = output.with_suffix(".onnx")
        onnx_manifest, onnx_files = build_onnx_artifact(
            ckpt, onnx_path, target="onnx", make_runner=reference_runner, atol=options.atol, rtol=options.rtol, opset=settings.opset,
            trust_code=options.trust_model_code, precision=plan.onnx_precision, io=settings.io if plan.onnx_precision in ("fp16", "bf16") else "fp32",
            calibration=calibration,
        )  # fmt: skip
        # TensorRT's ONNX parser reads only graph.initializer: build from the dense twin.
        dense_onnx = onnx.load(str(onnx_files["dense"]))
        fp32_names = {layer["initializer"]: layer["param"] for layer in onnx_manifest["layers"]}
        input_name = dense_onnx.graph.input[0].name
        input_shape = tuple(ckpt.model.input_shape)
        eligibility = layer_eligibility(_fp32_view(dense_onnx), settings.precision)
        init_to_param = {**fp32_names, **{k.removesuffix("_quantized"): v for k, v in fp32_names.items()}}
        nodes = node_to_param(dense_onnx, init_to_param)
        engines = {"dense": output.with_name(f"{output.stem}.dense{output.suffix}"), "sparse": output}
        reports, caches = {}, {}
        for variant, path in engines.items():
            with atomic_path(path) as tmp:
                layer_info_path = path.with_suffix(".layers.json")
                if use_trtexec:
                    command = trtexec_command(find_trtexec() or "trtexec", onnx_files["dense"], tmp, layer_info_path, settings, input_name, input_shape, sparse=variant == "sparse", plan=plan)
                    log = run_trtexec(command, path.with_suffix(".build.log"))
                    layer_info = layer_info_path.read_text()
                    caches[variant] = {"path": str(settings.timing_cache), "handled_by": "trtexec --timingCacheFile"}
                else:
                    from .builder import build_engine

                    result = build_engine(onnx_files["dense"].read_bytes(), tmp, settings, input_name, input_shape, sparse=variant == "sparse", plan=plan, trt=trt)
                    log, layer_info = result.log, result.layer_info
                    path.with_suffix(".build.log").write_text("\n".join(result.lines))
                    layer_info_path.write_text(layer_info)
                    caches[variant] = result.timing_cache
            info = parse_engine_info(layer_info)
            reports[variant] = (sparsity_record(eligibility, log, info, nodes, init_to_param), info.schema)
        parity = self._parity(onnx_files["dense"], output, plan, settings, input_shape, options)
        if not parity["passed"]:
            for path in engines.values():
                path.unlink(missing_ok=True)
            raise GateFailed(f"TensorRT parity failed against ONNX Runtime: max |Δ| {parity['max_abs']:.3g}")
        sparse_report, schema = reports["sparse"]
        manifest = base_manifest(self.name, ckpt)
        manifest.update(
            {
                "format": "tensorrt-engine",
                "setup": current_setup(),
                "settings": {k: str(v) for k, v in settings.__dict__.items()},
                "builder": "trtexec" if use_trtexec else "python-api",
                "tensorrt_api": {"features": features.to_json(), "plan": plan.to_json()},
                "timing_cache": caches,
                "inspector_schema": schema,
                "layers": sparse_report.layers,
                "sparse_layers": sparse_report.sparse_params(),
                "unmapped_engine_layers": sparse_report.unmapped_engine_layers,
                "params_not_located": sparse_report.params_not_located,
                "evidence": sparse_report.evidence,
                "parity_vs_ort": parity,
                "onnx_manifest": onnx_files["manifest"].name,
                "files": {variant: file_record(path) for variant, path in engines.items()},
            }
        )
        manifest_path = manifest_path_for(output)
        write_json_atomic(manifest_path, manifest)
        return Artifact(self.name, engines, manifest_path, manifest)

    def _parity(self, onnx_path: Path, engine_path: Path, plan: BuildPlan, settings: BuildSettings, input_shape, options: BuildOptions) -> dict:
        from .builder import EngineRunner

        atol, rtol, range_relative = engine_tolerance(plan, options.atol, options.rtol)
        inputs = parity_inputs(input_shape, (settings.min_batch, settings.opt_batch))
        runner = EngineRunner(engine_path)
        try:
            return engine_parity(reference_runner(onnx_path), runner.run, inputs, atol, rtol, range_relative)
        finally:
            runner.close()

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None):
        check_engine_compat(artifact.manifest.get("setup", {}), current_setup(), str(artifact.manifest_path))
        from .builder import EngineRunner

        return EngineRunner(artifact.files[variant])


def _fp32_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with fp16/bf16 and Q/DQ-fed weights read as float32 values, for the 2:4 eligibility rules."""
    from onnx import TensorProto, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), name=init.name))
    producers = {o: n for n in out.graph.node for o in n.output}
    inits = {i.name: i for i in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        producer = producers.get(node.input[1])
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in inits:
            weight = numpy_helper.to_array(inits[producer.input[0]]).astype(np.float32)
            name = producer.input[0].removesuffix("_quantized")
            out.graph.initializer.append(numpy_helper.from_array(weight, name=name))
            node.input[1] = name
    return out


__all__ = ["TensorRTTarget"]
