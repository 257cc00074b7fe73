"""The ``trt`` target: a dense and a sparse-weights TensorRT engine with identical settings.

Works with TensorRT 10.x and 11.x (``tensorrt>=10,<12``): :mod:`.api` detects which surface
the installed module (or ``trtexec``) has and plans the build -- precision flags on an fp32
ONNX where weak typing exists, a typed ONNX (fp16/bf16 casts, INT8 Q/DQ) from
``build_onnx(..., precision=...)`` otherwise. The manifest records the features, the plan
that ran, the timing-cache outcome and, per checkpoint layer, what TensorRT did and on what
evidence (inspector fields first, builder log second).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as schema

from . import PINNED_TENSORRT
from .api import BuildPlan, TrtFeatures, detect, plan_build
from .compat import check_engine_compat, current_setup
from .core import (
    INT8_RANGE_TOLERANCE, PRECISION_TOLERANCES, Artifact, ArtifactWriter, Availability, BuildOptions, GateFailed, Target, build_onnx,
    load_calibration, ort_runner, parity_feeds,
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


@schema(frozen=True, config=ConfigDict(extra="allow"))
class TrtDetails:
    """The part of a trt artifact's manifest the loader needs."""

    setup: dict[str, Any]


def engine_tolerance(plan: BuildPlan, atol: float, rtol: float) -> tuple[float, float, bool]:
    """(atol, rtol, range_relative) of the engine-vs-ONNX-Runtime parity for this plan."""
    if plan.precision == "int8":
        return 0.0, INT8_RANGE_TOLERANCE, True
    if plan.precision == "fp32":
        return atol, rtol, False
    if plan.onnx_precision in ("fp16", "bf16"):  # typed ONNX: the same dtype on both sides
        a, r = PRECISION_TOLERANCES[plan.onnx_precision]
        return max(atol, a), max(rtol, r), False
    loose = {"fp16": 1e-2, "tf32": 1e-2, "bf16": 5e-2}[plan.precision]  # reduced precision in TensorRT vs an fp32 reference
    return max(atol, loose), max(rtol, loose), False


def engine_parity(reference, candidate, feeds, atol: float, rtol: float, range_relative: bool, output_names=None):
    """The engine vs ONNX Runtime on the same ONNX; INT8 per output relative to the output's range."""
    from .core import ParityReport, compare

    if not range_relative:
        return compare(reference, candidate, feeds, atol=atol, rtol=rtol, output_names=output_names)
    loose = compare(reference, candidate, feeds, atol=float("inf"), rtol=0.0, output_names=output_names)
    if loose.problem:
        return loose
    passed = all(o.max_rel <= rtol for o in loose.outputs)
    return ParityReport(max_abs=loose.max_abs, max_rel=loose.max_rel, atol=0.0, rtol=rtol, batches=loose.batches, passed=passed, outputs=loose.outputs)


class TensorRTTarget(Target):
    name: ClassVar[str] = "trt"
    description: ClassVar[str] = f"TensorRT engine with BuilderFlag.SPARSE_WEIGHTS (TensorRT {PINNED_TENSORRT}, 10.x and 11.x)"
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
        settings = BuildSettings.from_options(options.extra)
        features, use_trtexec = self.features(settings)
        plan = plan_build(settings.precision, features, settings.typing)
        return self.build_with(ckpt, output, options, settings, features, plan, use_trtexec)

    def build_with(self, ckpt, output: Path, options: BuildOptions, settings: BuildSettings, features: TrtFeatures, plan: BuildPlan, use_trtexec: bool, trt=None, engine_parity_check=None) -> Artifact:
        """The build once the TensorRT surface and plan are known.

        ``trt`` (a module to use instead of the installed ``tensorrt``) and ``engine_parity_check``
        (engine bytes, feeds -> ParityReport) let tests run this without TensorRT or a GPU.
        """
        calibration = load_calibration(settings.calibration, ckpt.model.input_shape, samples=settings.calibration_samples) if plan.onnx_precision == "int8" else None
        onnx_build = build_onnx(
            ckpt, make_runner=ort_runner, atol=options.atol, rtol=options.rtol, opset=settings.opset, trust_code=options.trust_model_code,
            precision=plan.onnx_precision, io=settings.io if plan.onnx_precision in ("fp16", "bf16") else "fp32", calibration=calibration,
        )  # fmt: skip
        if not onnx_build.parity.passed:
            raise GateFailed(f"parity failed between PyTorch and ONNX Runtime ({plan.onnx_precision} ONNX): max |Δ| {onnx_build.parity.max_abs:.3g}; nothing was written")
        # TensorRT's ONNX parser reads only graph.initializer: build from the dense twin.
        dense_onnx = onnx.load_from_string(onnx_build.dense_bytes)
        input_name = dense_onnx.graph.input[0].name
        input_shape = tuple(ckpt.model.input_shape)
        eligibility = layer_eligibility(_fp32_view(dense_onnx), settings.precision)
        init_to_param = {layer.initializer: layer.param for layer in onnx_build.layers}
        init_to_param.update({k.removesuffix("_quantized"): v for k, v in list(init_to_param.items())})
        nodes = node_to_param(dense_onnx, init_to_param)
        reports, caches = {}, {}
        with ArtifactWriter(output, inputs=[ckpt.source]) as writer:
            writer.write_bytes("onnx", "model.dense.onnx", onnx_build.dense_bytes)
            onnx_path = writer.staged_path("model.dense.onnx")
            settings = BuildSettings(**{**settings.__dict__, "timing_cache": settings.timing_cache or writer.staged_path("timing.cache")})
            for variant, name in (("dense", "model.dense.engine"), ("sparse", "model.engine")):
                engine_path = writer.staged_path(name)
                layer_info_path = writer.staged_path(f"{variant}.layers.json")
                log_path = writer.staged_path(f"{variant}.build.log")
                if use_trtexec:
                    command = trtexec_command(find_trtexec() or "trtexec", onnx_path, engine_path, layer_info_path, settings, input_name, input_shape, sparse=variant == "sparse", plan=plan)
                    log = run_trtexec(command, log_path)
                    layer_info = layer_info_path.read_text()
                    caches[variant] = {"path": str(settings.timing_cache), "handled_by": "trtexec --timingCacheFile"}
                else:
                    from .builder import build_engine

                    result = build_engine(onnx_build.dense_bytes, engine_path, settings, input_name, input_shape, sparse=variant == "sparse", plan=plan, trt=trt)
                    log, layer_info = result.log, result.layer_info
                    log_path.write_text("\n".join(result.lines))
                    layer_info_path.write_text(layer_info)
                    caches[variant] = result.timing_cache
                writer.add_file(variant, name)
                writer.add_file(f"{variant}_layers", layer_info_path.name)
                writer.add_file(f"{variant}_log", log_path.name)
                info = parse_engine_info(layer_info)
                reports[variant] = (sparsity_record(eligibility, log, info, nodes, init_to_param), info.schema)
            feeds = parity_feeds(ckpt.model.inputs, (settings.min_batch, settings.opt_batch))
            engine_bytes = writer.staged_path("model.engine").read_bytes()
            if engine_parity_check is None:
                from .builder import EngineRunner

                atol, rtol, relative = engine_tolerance(plan, options.atol, options.rtol)
                runner = EngineRunner(engine_bytes)
                try:
                    parity = engine_parity(ort_runner(onnx_build.dense_bytes), runner.run, feeds, atol, rtol, relative, onnx_build.output_names)
                finally:
                    runner.close()
            else:
                parity = engine_parity_check(engine_bytes, feeds)
            sparse_report, schema_name = reports["sparse"]
            return writer.commit(
                target=self.name,
                format="tensorrt-engine",
                ckpt=ckpt,
                outputs=onnx_build.output_names,
                parity=parity,
                layers=onnx_build.layers,
                graph_2_4=onnx_build.graph_2_4,
                details={
                    "setup": current_setup(),
                    "settings": {k: str(v) for k, v in settings.__dict__.items()},
                    "builder": "trtexec" if use_trtexec else "python-api",
                    "tensorrt_api": {"features": features.to_json(), "plan": plan.to_json()},
                    "onnx_precision": onnx_build.precision or {"precision": "fp32"},
                    "timing_cache": caches,
                    "inspector_schema": schema_name,
                    "sparsity": sparse_report.to_json(),
                    "sparse_layers": sparse_report.sparse_params(),
                    "parity_reference": f"onnxruntime CPU on the {plan.onnx_precision} dense ONNX",
                },
                extra_tools=("tensorrt",),
            )

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None, *, trust_model_code: bool = False):
        details = artifact.manifest.details_as(TrtDetails)
        check_engine_compat(details.setup, current_setup(), str(artifact.manifest_path))
        from .builder import EngineRunner

        return EngineRunner(artifact.read(variant))


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
