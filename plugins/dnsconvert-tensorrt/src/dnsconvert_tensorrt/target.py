"""The ``trt`` target: a dense and a sparse-weights TensorRT engine with identical settings."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import onnx
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as schema

from dnsconvert.plugin import (
    Artifact,
    ArtifactWriter,
    Availability,
    BuildOptions,
    GateFailed,
    OrtRunner,
    Target,
    TargetError,
    build_onnx,
    compare,
    parity_feeds,
)

from . import PINNED_TENSORRT
from .compat import check_engine_compat, current_setup
from .eligibility import layer_eligibility
from .logparse import parse_layer_info
from .report import node_to_param, sparsity_record
from .settings import OPTION_HELP, BuildSettings
from .trtexec import find_trtexec, run_trtexec, trtexec_command


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


class TensorRTTarget(Target):
    name: ClassVar[str] = "trt"
    description: ClassVar[str] = f"TensorRT engine with BuilderFlag.SPARSE_WEIGHTS (TensorRT {PINNED_TENSORRT})"
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

    def build(self, ckpt, output: Path, options: BuildOptions) -> Artifact:
        self.check_options(options.extra)
        self.require_available()
        settings = BuildSettings.from_options(options.extra, None)
        onnx_build = build_onnx(ckpt, make_runner=lambda model: OrtRunner(model).run, atol=options.atol, rtol=options.rtol, opset=settings.opset, trust_code=options.trust_model_code)
        if not onnx_build.parity.passed:
            raise GateFailed(f"parity failed between PyTorch and ONNX Runtime: max |Δ| {onnx_build.parity.max_abs:.3g}; nothing was written")
        # TensorRT's ONNX parser reads only graph.initializer: build from the dense twin.
        dense_onnx = onnx.load_from_string(onnx_build.dense_bytes)
        input_name = dense_onnx.graph.input[0].name
        input_shape = tuple(ckpt.model.input_shape)
        eligibility = layer_eligibility(dense_onnx, settings.precision)
        init_to_param = {layer.initializer: layer.param for layer in onnx_build.layers}
        nodes = node_to_param(dense_onnx, init_to_param)
        use_trtexec = settings.use_trtexec or importlib.util.find_spec("tensorrt") is None
        records = {}
        with ArtifactWriter(output, inputs=[ckpt.source]) as writer:
            writer.write_bytes("onnx", "model.dense.onnx", onnx_build.dense_bytes)
            onnx_path = writer.staged_path("model.dense.onnx")
            cache = settings.timing_cache or writer.staged_path("timing.cache")
            settings = BuildSettings(**{**settings.__dict__, "timing_cache": cache})
            for variant, name in (("dense", "model.dense.engine"), ("sparse", "model.engine")):
                engine_path = writer.staged_path(name)
                layer_info_path = writer.staged_path(f"{variant}.layers.json")
                log_path = writer.staged_path(f"{variant}.build.log")
                if use_trtexec:
                    command = trtexec_command(find_trtexec() or "trtexec", onnx_path, engine_path, layer_info_path, settings, input_name, input_shape, sparse=variant == "sparse")
                    log = run_trtexec(command, log_path)
                    layer_info = layer_info_path.read_text()
                else:
                    from .builder import build_engine

                    log, layer_info, lines = build_engine(onnx_build.dense_bytes, engine_path, settings, input_name, input_shape, sparse=variant == "sparse")
                    log_path.write_text("\n".join(lines))
                    layer_info_path.write_text(layer_info)
                writer.add_file(variant, name)
                writer.add_file(f"{variant}_layers", layer_info_path.name)
                writer.add_file(f"{variant}_log", log_path.name)
                records[variant] = sparsity_record(eligibility, log, parse_layer_info(layer_info), nodes, init_to_param)
            from .builder import EngineRunner

            feeds = parity_feeds(ckpt.model.inputs, (settings.min_batch, settings.opt_batch))
            tolerance = 1e-2 if settings.precision in ("fp16", "bf16", "int8") else options.atol
            reference = OrtRunner(onnx_build.dense_bytes).run
            parity = compare(reference, EngineRunner(writer.staged_path("model.engine").read_bytes()).run, feeds, atol=max(options.atol, tolerance), rtol=max(options.rtol, tolerance))
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
                    "layers": records["sparse"],
                    "sparse_layers": [r["param"] for r in records["sparse"] if r["sparse_picked"]],
                    "parity_reference": "onnxruntime (dense ONNX)",
                },
                extra_tools=("tensorrt",),
            )

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None, *, trust_model_code: bool = False):
        details = artifact.manifest.details_as(TrtDetails)
        check_engine_compat(details.setup, current_setup(), str(artifact.manifest_path))
        from .builder import EngineRunner

        return EngineRunner(artifact.read(variant))


__all__ = ["TensorRTTarget", "TargetError"]
