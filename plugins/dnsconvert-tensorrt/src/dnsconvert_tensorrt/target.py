"""The ``trt`` target: a dense and a sparse-weights TensorRT engine with identical settings."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import onnx

from dnsconvert._atomic import atomic_path, write_json_atomic
from dnsconvert.errors import GateFailed, TargetError
from dnsconvert.targets.base import Artifact, Availability, BuildOptions, Target

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


class TensorRTTarget(Target):
    name: ClassVar[str] = "trt"
    description: ClassVar[str] = f"TensorRT engine with BuilderFlag.SPARSE_WEIGHTS (TensorRT {PINNED_TENSORRT})"
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

    def build(self, ckpt, output: Path, options: BuildOptions) -> Artifact:
        from dnsconvert.export import build_onnx_artifact
        from dnsconvert.export.manifest import base_manifest, file_record, manifest_path_for
        from dnsconvert.export.parity import compare, parity_inputs
        from dnsconvert.targets.ort import OrtRunner

        self.check_options(options.extra)
        self.require_available()
        settings = BuildSettings.from_options(options.extra, output.with_suffix(".timing-cache"))
        onnx_path = output.with_suffix(".onnx")
        onnx_manifest, onnx_files = build_onnx_artifact(
            ckpt, onnx_path, target="onnx", make_runner=lambda model: OrtRunner(model).run, atol=options.atol, rtol=options.rtol,
            opset=settings.opset, trust_code=options.trust_model_code,
        )  # fmt: skip
        # TensorRT's ONNX parser reads only graph.initializer: build from the dense twin.
        dense_onnx = onnx.load(str(onnx_files["dense"]))
        input_name = dense_onnx.graph.input[0].name
        input_shape = tuple(ckpt.model.input_shape)
        eligibility = layer_eligibility(dense_onnx, settings.precision)
        init_to_param = {layer["initializer"]: layer["param"] for layer in onnx_manifest["layers"]}
        nodes = node_to_param(dense_onnx, init_to_param)
        engines = {"dense": output.with_name(f"{output.stem}.dense{output.suffix}"), "sparse": output}
        records = {}
        use_trtexec = settings.use_trtexec or importlib.util.find_spec("tensorrt") is None
        for variant, path in engines.items():
            with atomic_path(path) as tmp:
                layer_info_path = path.with_suffix(".layers.json")
                if use_trtexec:
                    command = trtexec_command(find_trtexec() or "trtexec", onnx_files["dense"], tmp, layer_info_path, settings, input_name, input_shape, sparse=variant == "sparse")
                    log = run_trtexec(command, path.with_suffix(".build.log"))
                    layer_info = layer_info_path.read_text()
                else:
                    from .builder import build_engine

                    log, layer_info, lines = build_engine(onnx_files["dense"].read_bytes(), tmp, settings, input_name, input_shape, sparse=variant == "sparse")
                    path.with_suffix(".build.log").write_text("\n".join(lines))
                    layer_info_path.write_text(layer_info)
            records[variant] = sparsity_record(eligibility, log, parse_layer_info(layer_info), nodes, init_to_param)
        from .builder import EngineRunner

        inputs = parity_inputs(input_shape, (settings.min_batch, settings.opt_batch))
        tolerance = 1e-2 if settings.precision in ("fp16", "bf16", "int8") else options.atol
        parity = compare(OrtRunner(str(onnx_files["dense"])).run, EngineRunner(output).run, inputs, atol=max(options.atol, tolerance), rtol=max(options.rtol, tolerance))
        if not parity.passed:
            for path in engines.values():
                path.unlink(missing_ok=True)
            raise GateFailed(f"TensorRT parity failed against ONNX Runtime: max |Δ| {parity.max_abs:.3g}")
        manifest = base_manifest(self.name, ckpt)
        manifest.update(
            {
                "format": "tensorrt-engine",
                "setup": current_setup(),
                "settings": {k: str(v) for k, v in settings.__dict__.items()},
                "builder": "trtexec" if use_trtexec else "python-api",
                "layers": records["sparse"],
                "sparse_layers": [r["param"] for r in records["sparse"] if r["sparse_picked"]],
                "parity_vs_ort": parity.to_json(),
                "onnx_manifest": onnx_files["manifest"].name,
                "files": {variant: file_record(path) for variant, path in engines.items()},
            }
        )
        manifest_path = manifest_path_for(output)
        write_json_atomic(manifest_path, manifest)
        return Artifact(self.name, engines, manifest_path, manifest)

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None):
        check_engine_compat(artifact.manifest.get("setup", {}), current_setup(), str(artifact.manifest_path))
        from .builder import EngineRunner

        return EngineRunner(artifact.files[variant])


__all__ = ["TensorRTTarget", "TargetError"]
