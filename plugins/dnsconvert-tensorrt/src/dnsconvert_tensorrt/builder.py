"""Build TensorRT engines through the Python API (TensorRT 10.x and 11.x), capturing the builder log.

The calls (build and runner), by generation, are listed with their sources in ``tests/fake_tensorrt.py``
(TensorRT Python API pages for 10.x and 11.x, NVIDIA's 10.x -> 11.x migration pages, and the
``python/src/infer/pyCore.cpp`` bindings); the tests run this module against stand-in
``tensorrt`` modules exposing exactly one generation's surface. Precision comes from the
:class:`~dnsconvert_tensorrt.api.BuildPlan`: builder flags only where TensorRT has them.
This module has NOT been run against a real TensorRT: no machine here has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import BuildPlan
from .core import TargetError
from .logparse import SparsityLog, parse_builder_log
from .settings import BuildSettings

LOG_THRESHOLD = {"info": "INFO", "verbose": "VERBOSE"}


def capturing_logger(trt: Any, lines: list[str], level: str = "info"):
    """An ``ILogger`` that keeps messages at ``level`` or more severe.

    TensorRT calls ``log`` for every message whatever the level; filtering is the subclass's job.
    (``min_severity`` is an attribute of ``trt.Logger`` only; set on an ``ILogger`` subclass it
    does nothing.) Severity values: INTERNAL_ERROR 0 < ERROR < WARNING < INFO < VERBOSE 4.
    """
    threshold = int(getattr(trt.ILogger.Severity, LOG_THRESHOLD[level]))

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:  # noqa: D401 - TensorRT callback
            if int(severity) <= threshold:
                lines.append(f"[{severity.name}] {msg}")

    return CapturingLogger()


@dataclass
class BuildResult:
    log: SparsityLog
    layer_info: str
    lines: list[str]
    timing_cache: dict[str, Any] = field(default_factory=dict)


def _apply_timing_cache(trt: Any, config: Any, path: Path | None) -> dict[str, Any]:
    """Load the timing cache into ``config``; say whether it was used and why not."""
    status: dict[str, Any] = {"path": str(path) if path else None, "found": bool(path and path.exists())}
    if path is None:
        status["used"] = False
        return status
    cache_bytes = path.read_bytes() if status["found"] else b""
    cache = config.create_timing_cache(cache_bytes)
    accepted = config.set_timing_cache(cache, ignore_mismatch=False)
    status["used"] = bool(accepted) and bool(cache_bytes)
    if not accepted:
        # False when the cache was recorded on a GPU with other properties (or another TensorRT):
        # build without it, on a fresh cache that is then written for this GPU.
        status["reason"] = "set_timing_cache returned False: the cache was recorded on another GPU or TensorRT; built without it and rewrote it for this GPU"
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            status["reason"] += " (an empty cache was refused too: built with no cache)"
    return status


def _save_timing_cache(config: Any, path: Path | None, status: dict[str, Any]) -> None:
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is None:
        status["written"] = False
        status.setdefault("reason", "get_timing_cache() returned None after the build: nothing to write")
        return
    partial = path.with_name(path.name + ".partial")  # never a half-written cache
    partial.write_bytes(bytes(cache.serialize()))
    partial.replace(path)
    status["written"] = True


def build_engine(
    onnx_bytes: bytes,
    engine_path: Path,
    settings: BuildSettings,
    input_name: str,
    input_shape: tuple[int, ...],
    *,
    sparse: bool,
    plan: BuildPlan,
    trt: Any = None,
) -> BuildResult:
    """Build one engine into ``engine_path``; ``trt`` defaults to the installed ``tensorrt``."""
    if trt is None:
        import tensorrt as trt

    lines: list[str] = []
    logger = capturing_logger(trt, lines, settings.log)
    builder = trt.Builder(logger)
    network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed_network else 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TargetError(f"TensorRT's ONNX parser rejected the model: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for name in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    low, opt, high = settings.shapes(input_shape)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_status = _apply_timing_cache(trt, config, settings.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = [line for line in lines if line.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
        raise TargetError(f"TensorRT could not build the engine: {(errors or ['see the builder log'])[-1][:400]}")
    engine_path.write_bytes(bytes(serialized))
    _save_timing_cache(config, settings.timing_cache, cache_status)
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    if engine is None:
        raise TargetError("TensorRT built an engine it cannot deserialize", hint="see the builder log")
    layer_info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return BuildResult(parse_builder_log(lines), layer_info, lines, cache_status)


def torch_dtype(trt: Any, trt_dtype: Any):
    """The torch dtype of a TensorRT I/O tensor type (both generations spell them the same)."""
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
    for name, dtype in table.items():
        if hasattr(trt.DataType, name) and trt_dtype == getattr(trt.DataType, name):
            return dtype
    raise TargetError(f"engine I/O type {trt_dtype} has no torch equivalent here")


class EngineRunner:
    """Runs a serialized engine with torch CUDA tensors as I/O buffers (no pycuda needed).

    The runner protocol: named numpy feeds in (cast to each input's engine type, e.g. fp16 where
    a typed ONNX asked for native I/O), every output out (floating ones as float32).
    """

    def __init__(self, engine: bytes, *, trt: Any = None, device: str = "cuda"):
        """``trt`` and ``device="cpu"`` let the tests run this against a stand-in ``tensorrt`` (no GPU there)."""
        if trt is None:
            import tensorrt as trt
        import torch

        self.torch, self.device = torch, device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine)
        if self.engine is None:
            raise TargetError("TensorRT could not deserialize the engine", hint="it was built for another TensorRT version or GPU; rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream() if device == "cuda" else None

    def prepare(self, feeds):
        """The named inputs on the GPU in the engine's types (bench uploads once and times run_device alone)."""
        import numpy as np

        return {name: self.torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device, self.dtypes[name]).contiguous() for name in self.inputs}

    def run_device(self, tensors):
        # set_input_shape, set_tensor_address and execute_async_v3 return False on failure (10.x bindings); never ignore it
        torch = self.torch
        for name in self.inputs:
            shape = tuple(tensors[name].shape)
            if self.context.set_input_shape(name, shape) is False:
                raise TargetError(f"TensorRT refused input {name!r} of shape {list(shape)}", hint="the engine's optimization profile does not cover it; rebuild with -T min_batch/max_batch")
            self._bind(name, tensors[name])
        outputs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            self._bind(name, out)
            outputs.append(out)
        if self.context.execute_async_v3(self.stream.cuda_stream if self.stream is not None else 0) is False:
            raise TargetError("TensorRT could not enqueue the engine (execute_async_v3 returned False)", hint="TensorRT printed its reason above ([TRT] [E] ...)")
        return outputs

    def _bind(self, name: str, tensor) -> None:
        if self.context.set_tensor_address(name, tensor.data_ptr()) is False:
            raise TargetError(f"TensorRT refused the buffer of {name!r}")

    def run(self, feeds):
        outputs = self.run_device(self.prepare(feeds))
        self.synchronize()
        return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in outputs]

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def close(self) -> None:
        self.context = None
        self.engine = None
