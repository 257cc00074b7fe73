"""Build TensorRT engines through the Python API (TensorRT 10.x), capturing the verbose log.

Every call here is checked against the TensorRT 10 Python API documentation:
Builder.create_network(0) (explicit batch is the only mode in 10.x), OnnxParser.parse,
IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, n), set_flag(BuilderFlag.*),
profiling_verbosity = ProfilingVerbosity.DETAILED, create_timing_cache / set_timing_cache /
get_timing_cache().serialize(), Builder.create_optimization_profile + set_shape +
add_optimization_profile, Builder.build_serialized_network, Runtime.deserialize_cuda_engine,
ICudaEngine.create_engine_inspector().get_engine_information(LayerInformationFormat.JSON).
This module has NOT been run in this project's workplace: no machine here has TensorRT.
"""

from __future__ import annotations

from pathlib import Path

from dnsconvert.plugin import TargetError

from .logparse import SparsityLog, parse_builder_log
from .settings import BuildSettings


def _logger(trt, lines: list[str]):
    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:  # noqa: D401 - TensorRT callback
            lines.append(f"[{severity.name}] {msg}")

    return CapturingLogger()


def build_engine(onnx_bytes: bytes, engine_path: Path, settings: BuildSettings, input_name: str, input_shape: tuple[int, ...], *, sparse: bool) -> tuple[SparsityLog, str, list[str]]:
    """Build one engine; returns (sparsity log, engine layer-info JSON, the full log lines)."""
    import tensorrt as trt

    lines: list[str] = []
    logger = _logger(trt, lines)
    logger.min_severity = trt.ILogger.Severity.VERBOSE
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TargetError(f"TensorRT's ONNX parser rejected the model: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if settings.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if settings.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the ONNX carries Q/DQ nodes
    if settings.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    low, opt, high = settings.shapes(input_shape)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_bytes = settings.timing_cache.read_bytes() if settings.timing_cache and settings.timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = [line for line in lines if line.startswith("[ERROR]") or line.startswith("[INTERNAL_ERROR]")]
        raise TargetError(f"TensorRT could not build the engine: {(errors or ['see the verbose log'])[-1][:400]}")
    engine_path.write_bytes(bytes(serialized))
    if settings.timing_cache is not None:
        settings.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    layer_info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return parse_builder_log(lines), layer_info, lines


class EngineRunner:
    """Runs a serialized engine with torch CUDA tensors as I/O buffers (no pycuda needed)."""

    def __init__(self, engine: bytes):
        import tensorrt as trt
        import torch

        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine)
        if self.engine is None:
            raise TargetError("TensorRT could not deserialize the engine", hint="it was built for another TensorRT version or GPU; rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def prepare(self, feeds):
        """The named inputs on the GPU (bench uploads once and times run_device alone)."""
        import numpy as np

        return {name: self.torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda") for name in self.inputs}

    def run_device(self, tensors):
        import numpy as np
        import tensorrt as trt

        torch = self.torch
        for name in self.inputs:
            self.context.set_input_shape(name, tuple(tensors[name].shape))
            self.context.set_tensor_address(name, tensors[name].data_ptr())
        outputs = []
        for name in self.outputs:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        self.context.execute_async_v3(self.stream.cuda_stream)
        return outputs

    def run(self, feeds):
        outputs = self.run_device(self.prepare(feeds))
        self.stream.synchronize()
        return [o.cpu().numpy() for o in outputs]

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.context = None
        self.engine = None
