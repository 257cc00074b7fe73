"""Stand-in ``tensorrt`` modules exposing exactly one generation's documented Python surface.

TensorRT cannot be installed here, so the builder is run against these: every class has only
the attributes listed for its generation in ``SURFACES`` (anything else raises AttributeError,
as a missing pybind11 binding does), every call is recorded, and the engine inspector returns
the recorded layer-information samples. They stand in for what cannot exist on this machine
(TensorRT, a GPU); the code around them (plans, ONNX precision, parsing, reports) is real.
"""

from __future__ import annotations

import ctypes
import types
from typing import Any

import numpy as np
import onnx

# The Python API the plugin may use, per generation, with where each part is documented.
# 10.x: TensorRT 10.x Python API reference (docs.nvidia.com/deeplearning/tensorrt/10.x, pages
#   Core/Builder, Core/BuilderConfig, Core/Runtime, Core/EngineInspector, Core/TimingCache,
#   Parsers/Onnx) and the bindings in NVIDIA/TensorRT python/src/infer/pyCore.cpp
#   (.def("set_timing_cache", &IBuilderConfig::setTimingCache, "cache"_a, "ignore_mismatch"_a)
#   returns bool; .def("get_timing_cache", ...)); ICudaEngine name-based I/O per the 10.0
#   C++ reference (getTensorShape, getTensorDataType, getTensorIOMode).
#   Runtime (EngineRunner), from the same pyCore.cpp (10.x, with IRuntimeConfig): ILogger.Severity
#   .export_values() (so trt.Logger.WARNING), class Logger(min_severity=WARNING); Runtime(logger)
#   .deserialize_cuda_engine(serialized_engine) (None when it cannot); ICudaEngine.num_io_tensors
#   (property), get_tensor_name(index), get_tensor_mode(name), get_tensor_dtype(name),
#   create_execution_context(); IExecutionContext.set_input_shape(name, shape),
#   get_tensor_shape(name), set_tensor_address(name, memory), execute_async_v3(stream_handle) -> bool.
#   Python API pages Core/Runtime, Core/Engine, Core/ExecutionContext; NVIDIA's "Migrating I/O
#   Buffer Allocation to Named Tensors" (num_io_tensors, get_tensor_name, get_tensor_mode,
#   set_tensor_address, execute_async_v3) is the 8.x -> 10.x pattern the 11.x docs still carry.
# 11.x: TensorRT 11.0-11.4 Python API reference (Core/Builder 11.0: NetworkDefinitionCreationFlag
#   is STRONGLY_TYPED "[DEPRECATED] ... always enabled ... ignored", PREFER_AOT/JIT_PYTHON_PLUGINS;
#   Builder variables no longer list platform_has_*), and "Migrating Python Code from TensorRT
#   10.x to 11.x", Removed Python APIs: BuilderFlag.FP16/INT8/FP8/BF16/INT4/FP4,
#   OBEY/PREFER_PRECISION_CONSTRAINTS, DIRECT_IO, IBuilderConfig.int8_calibrator,
#   set/get_calibration_profile, quantization flags; C++ list: platformHasFastFp16/Int8 removed;
#   ILayer precision / output types removed with weak typing. BuilderFlag.TF32 and
#   SPARSE_WEIGHTS remain; IEngineInspector remains (JSON schema changed). The runtime calls above
#   stay in 11.x: the 11.0 Core/Engine page lists num_io_tensors, and the 11.x "Removed Python APIs"
#   list names none of them (its ICudaEngine entries are device_memory_size* -> *_v2).
_COMMON = {
    "module": ["__version__", "ILogger", "Logger", "Builder", "OnnxParser", "Runtime", "BuilderFlag", "NetworkDefinitionCreationFlag",
               "MemoryPoolType", "ProfilingVerbosity", "LayerInformationFormat", "TensorIOMode", "DataType"],
    "ILogger.Severity": ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"],
    "Logger": ["Severity", "INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE", "min_severity", "log"],
    "Builder": ["create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network"],
    "IBuilderConfig": ["set_memory_pool_limit", "profiling_verbosity", "set_flag", "clear_flag", "add_optimization_profile",
                       "create_timing_cache", "set_timing_cache", "get_timing_cache"],
    "OnnxParser": ["parse", "num_errors", "get_error"],
    "IOptimizationProfile": ["set_shape"],
    "Runtime": ["deserialize_cuda_engine"],
    "ICudaEngine": ["create_engine_inspector", "num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "create_execution_context"],
    "IExecutionContext": ["set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3"],
    "EngineInspector": ["get_engine_information"],
    "ITimingCache": ["serialize"],
    "MemoryPoolType": ["WORKSPACE"],
    "ProfilingVerbosity": ["LAYER_NAMES_ONLY", "DETAILED", "NONE"],
    "LayerInformationFormat": ["ONELINE", "JSON"],
    "TensorIOMode": ["NONE", "INPUT", "OUTPUT"],
    "DataType": ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8"],
}  # fmt: skip
SURFACES: dict[str, dict[str, list[str]]] = {
    "10": {
        **_COMMON,
        "Builder": [*_COMMON["Builder"], "platform_has_fast_fp16", "platform_has_fast_int8", "platform_has_tf32"],
        "IBuilderConfig": [*_COMMON["IBuilderConfig"], "int8_calibrator", "set_calibration_profile", "set_quantization_flag"],
        "BuilderFlag": ["FP16", "BF16", "INT8", "FP8", "INT4", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
                        "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS",
                        "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "STRIP_PLAN", "WEIGHT_STREAMING"],
        "NetworkDefinitionCreationFlag": ["EXPLICIT_BATCH", "STRONGLY_TYPED"],
    },
    "11": {
        **_COMMON,
        "BuilderFlag": ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS", "SAFETY_SCOPE", "VERSION_COMPATIBLE",
                        "EXCLUDE_LEAN_RUNTIME", "ERROR_ON_TIMING_CACHE_MISS", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING",
                        "EDITABLE_TIMING_CACHE"],
        "NetworkDefinitionCreationFlag": ["STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"],
    },
}  # fmt: skip
REMOVED_IN_11 = {
    "BuilderFlag": ["FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"],
    "Builder": ["platform_has_fast_fp16", "platform_has_fast_int8"],
    "IBuilderConfig": ["int8_calibrator", "set_calibration_profile", "set_quantization_flag"],
    "ILayer": ["precision", "set_output_type"],
}
DEPRECATED_IN_11 = {"NetworkDefinitionCreationFlag": ["STRONGLY_TYPED"]}  # accepted and ignored: the plugin must not rely on it


class EnumMember:
    def __init__(self, kind: str, name: str, value: int) -> None:
        self.kind, self.name, self.value = kind, name, value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EnumMember) and (self.kind, self.name) == (other.kind, other.name)

    def __hash__(self) -> int:
        return hash((self.kind, self.name))

    def __repr__(self) -> str:
        return f"{self.kind}.{self.name}"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.attributes: list[str] = []  # attributes resolved (used)
        self.probes: list[str] = []  # lookups that failed with AttributeError (feature detection)

    def call(self, what: str, arg: Any = None) -> None:
        self.calls.append((what, arg))


def make_enum(kind: str, members: list[str], recorder: Recorder):
    namespace = {name: EnumMember(kind, name, i) for i, name in enumerate(members)}

    class Meta(type):
        def __getattribute__(cls, name):
            try:
                value = type.__getattribute__(cls, name)
            except AttributeError:
                recorder.probes.append(f"{kind}.{name}")
                raise
            if not name.startswith("_"):
                recorder.attributes.append(f"{kind}.{name}")
            return value

    return Meta(kind, (), namespace)


class Surface:
    """Instances allow only their generation's attributes, and record each call."""

    _kind = ""

    def __init__(self, fake: FakeTensorRT) -> None:
        object.__setattr__(self, "_fake", fake)

    def __getattribute__(self, name: str):
        if not name.startswith("_"):
            fake = object.__getattribute__(self, "_fake")
            kind = type(self)._kind
            if name not in fake.surface[kind]:
                fake.recorder.probes.append(f"{kind}.{name}")
                raise AttributeError(f"TensorRT {fake.generation}.x: '{kind}' object has no attribute '{name}'")
            fake.recorder.attributes.append(f"{kind}.{name}")
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        fake = object.__getattribute__(self, "_fake")
        kind = type(self)._kind
        if name not in fake.surface[kind]:
            raise AttributeError(f"TensorRT {fake.generation}.x: cannot set '{kind}.{name}'")
        fake.recorder.call(f"{kind}.{name}=", value)
        object.__setattr__(self, name, value)


class FakeTensorRT:
    """Build a stand-in ``tensorrt`` module of one generation."""

    def __init__(self, generation: str, *, version: str | None = None, layer_info: str = '{"Layers": []}', accept_cache: bool = True,
                 timing_cache_none: bool = False, log_messages: tuple[tuple[str, str], ...] = (), refuse: str | None = None) -> None:  # fmt: skip
        self.generation = generation
        self.surface = SURFACES[generation]
        self.recorder = Recorder()
        self.layer_info = layer_info
        self.accept_cache = accept_cache
        self.timing_cache_none = timing_cache_none
        self.log_messages = log_messages
        self.refuse = refuse  # an IExecutionContext method that returns False, as TensorRT does on failure
        self.parsed_onnx: onnx.ModelProto | None = None
        self.module = self._module(version or f"{generation}.0.0")

    def _module(self, version: str) -> types.ModuleType:
        fake, rec = self, self.recorder
        module = types.ModuleType("tensorrt")
        module.__version__ = version
        enums = {kind: make_enum(kind, self.surface[kind], rec) for kind in
                 ("BuilderFlag", "NetworkDefinitionCreationFlag", "MemoryPoolType", "ProfilingVerbosity", "LayerInformationFormat", "TensorIOMode", "DataType")}  # fmt: skip
        severity = make_enum("ILogger.Severity", self.surface["ILogger.Severity"], rec)

        class ILogger:
            Severity = severity

            def __init__(self) -> None:
                pass

        class LoggerMeta(type):
            def __getattribute__(cls, name):
                if not name.startswith("_"):
                    if name not in fake.surface["Logger"]:
                        rec.probes.append(f"Logger.{name}")
                        raise AttributeError(f"TensorRT {fake.generation}.x: type object 'Logger' has no attribute '{name}'")
                    rec.attributes.append(f"Logger.{name}")
                return type.__getattribute__(cls, name)

        class Logger(ILogger, metaclass=LoggerMeta):
            # ILogger.Severity values are exported into the class scope (trt.Logger.WARNING)
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (getattr(severity, n) for n in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"))

            def __init__(self, min_severity=None) -> None:
                self.min_severity = min_severity if min_severity is not None else severity.WARNING

        class TimingCache(Surface):
            _kind = "ITimingCache"

            def __init__(self, data: bytes) -> None:
                super().__init__(fake)
                object.__setattr__(self, "data", data)

            def serialize(self) -> bytes:
                rec.call("ITimingCache.serialize")
                return b"cache-for-this-gpu"

        class OptimizationProfile(Surface):
            _kind = "IOptimizationProfile"

            def set_shape(self, name, low, opt, high) -> None:
                rec.call("IOptimizationProfile.set_shape", (name, tuple(low), tuple(opt), tuple(high)))

        class BuilderConfig(Surface):
            _kind = "IBuilderConfig"

            def __init__(self) -> None:
                super().__init__(fake)
                object.__setattr__(self, "_cache", None)

            def set_memory_pool_limit(self, pool, size) -> None:
                rec.call("IBuilderConfig.set_memory_pool_limit", (pool, size))

            def set_flag(self, flag) -> None:
                rec.call("IBuilderConfig.set_flag", flag.name)

            def clear_flag(self, flag) -> None:
                rec.call("IBuilderConfig.clear_flag", flag.name)

            def add_optimization_profile(self, profile) -> int:
                rec.call("IBuilderConfig.add_optimization_profile")
                return 0

            def create_timing_cache(self, data: bytes):
                rec.call("IBuilderConfig.create_timing_cache", bytes(data))
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
                rec.call("IBuilderConfig.set_timing_cache", (object.__getattribute__(cache, "data"), ignore_mismatch))
                accepted = fake.accept_cache or object.__getattribute__(cache, "data") == b""
                if accepted:
                    object.__setattr__(self, "_cache", cache)
                return accepted

            def get_timing_cache(self):
                rec.call("IBuilderConfig.get_timing_cache")
                return None if fake.timing_cache_none else object.__getattribute__(self, "_cache")

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags

        class Builder(Surface):
            _kind = "Builder"

            def __init__(self, logger) -> None:
                super().__init__(fake)
                object.__setattr__(self, "_logger", logger)

            def create_network(self, flags: int = 0):
                rec.call("Builder.create_network", int(flags))
                return Network(int(flags))

            def create_builder_config(self):
                rec.call("Builder.create_builder_config")
                return BuilderConfig()

            def create_optimization_profile(self):
                rec.call("Builder.create_optimization_profile")
                return OptimizationProfile(fake)

            def build_serialized_network(self, network, config):
                rec.call("Builder.build_serialized_network")
                logger = object.__getattribute__(self, "_logger")
                for level, message in fake.log_messages:  # TensorRT calls log() for every message, whatever the level
                    logger.log(getattr(severity, level), message)
                return b"serialized-engine"

        class OnnxParser(Surface):
            _kind = "OnnxParser"

            def __init__(self, network, logger) -> None:
                super().__init__(fake)
                object.__setattr__(self, "num_errors", 0)

            def parse(self, data: bytes) -> bool:
                rec.call("OnnxParser.parse")
                fake.parsed_onnx = onnx.load_from_string(data)
                return True

            def get_error(self, index: int):
                return "no error"

        class Inspector(Surface):
            _kind = "EngineInspector"

            def get_engine_information(self, fmt) -> str:
                rec.call("EngineInspector.get_engine_information", fmt.name)
                return fake.layer_info

        class Context(Surface):
            """Runs the parsed ONNX with ONNX Runtime on host buffers given by address, as the engine would on device ones."""

            _kind = "IExecutionContext"

            def __init__(self, engine) -> None:
                super().__init__(fake)
                object.__setattr__(self, "_engine", engine)
                object.__setattr__(self, "_shapes", {})
                object.__setattr__(self, "_addresses", {})

            def set_input_shape(self, name: str, shape) -> bool:
                rec.call("IExecutionContext.set_input_shape", (name, tuple(shape)))
                io = object.__getattribute__(self, "_engine")._io
                if fake.refuse == "set_input_shape" or name not in io or io[name][0] != "INPUT" or len(shape) != len(io[name][2]):
                    return False
                object.__getattribute__(self, "_shapes")[name] = tuple(int(d) for d in shape)
                return True

            def get_tensor_shape(self, name: str):
                rec.call("IExecutionContext.get_tensor_shape", name)
                engine, shapes = object.__getattribute__(self, "_engine"), object.__getattribute__(self, "_shapes")
                if engine._io[name][0] == "INPUT":
                    return shapes.get(name, engine._io[name][2])
                if not all(n in shapes for n in engine._inputs()):
                    return engine._io[name][2]  # -1 where dynamic, until every input shape is set
                feeds = {n: np.zeros(shapes[n], dtype=engine._numpy(n)) for n in engine._inputs()}
                return tuple(engine._run(feeds)[name].shape)

            def set_tensor_address(self, name: str, memory: int) -> bool:
                rec.call("IExecutionContext.set_tensor_address", name)
                if fake.refuse == "set_tensor_address" or not isinstance(memory, int) or memory == 0:
                    return False
                object.__getattribute__(self, "_addresses")[name] = memory
                return True

            def execute_async_v3(self, stream_handle: int) -> bool:
                rec.call("IExecutionContext.execute_async_v3", stream_handle)
                engine = object.__getattribute__(self, "_engine")
                shapes, addresses = object.__getattribute__(self, "_shapes"), object.__getattribute__(self, "_addresses")
                if fake.refuse == "execute_async_v3" or set(addresses) != set(engine._io) or not all(n in shapes for n in engine._inputs()):
                    return False
                feeds = {}
                for n in engine._inputs():
                    dtype = engine._numpy(n)
                    size = int(np.prod(shapes[n])) * dtype.itemsize
                    feeds[n] = np.frombuffer((ctypes.c_char * size).from_address(addresses[n]), dtype=dtype).reshape(shapes[n]).copy()
                for n, value in engine._run(feeds).items():
                    value = np.ascontiguousarray(value, dtype=engine._numpy(n))
                    ctypes.memmove(addresses[n], value.ctypes.data, value.nbytes)
                return True

        onnx_types = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BFLOAT16: "BF16", onnx.TensorProto.INT64: "INT64",
                      onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL"}  # fmt: skip
        numpy_types = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}  # no bf16 in numpy

        class Engine(Surface):
            """The engine of the last parsed ONNX: its graph inputs and outputs are the I/O tensors (dynamic dims as -1)."""

            _kind = "ICudaEngine"

            def __init__(self, model: onnx.ModelProto) -> None:
                super().__init__(fake)
                io = {}
                for mode, values in (("INPUT", model.graph.input), ("OUTPUT", model.graph.output)):
                    for v in values:
                        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
                        io[v.name] = (mode, onnx_types[v.type.tensor_type.elem_type], dims)
                object.__setattr__(self, "_io", io)
                object.__setattr__(self, "_model", model)
                object.__setattr__(self, "num_io_tensors", len(io))

            def _inputs(self) -> list[str]:
                return [n for n, (mode, _, _) in object.__getattribute__(self, "_io").items() if mode == "INPUT"]

            def _numpy(self, name: str) -> np.dtype:
                return np.dtype(numpy_types[object.__getattribute__(self, "_io")[name][1]])

            def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                import onnxruntime as ort

                model = object.__getattribute__(self, "_model")
                session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
                return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

            def get_tensor_name(self, index: int) -> str:
                rec.call("ICudaEngine.get_tensor_name", index)
                return list(object.__getattribute__(self, "_io"))[index]

            def get_tensor_mode(self, name: str):
                rec.call("ICudaEngine.get_tensor_mode", name)
                io = object.__getattribute__(self, "_io")
                return getattr(enums["TensorIOMode"], io[name][0] if name in io else "NONE")

            def get_tensor_dtype(self, name: str):
                rec.call("ICudaEngine.get_tensor_dtype", name)
                return getattr(enums["DataType"], object.__getattribute__(self, "_io")[name][1])

            def create_execution_context(self):
                rec.call("ICudaEngine.create_execution_context")
                return Context(self)

            def create_engine_inspector(self):
                rec.call("ICudaEngine.create_engine_inspector")
                return Inspector(fake)

        class Runtime(Surface):
            _kind = "Runtime"

            def __init__(self, logger) -> None:
                super().__init__(fake)

            def deserialize_cuda_engine(self, data: bytes):
                rec.call("Runtime.deserialize_cuda_engine")
                if bytes(data) != b"serialized-engine" or fake.parsed_onnx is None:
                    return None  # as the bindings do when TensorRT cannot deserialize
                return Engine(fake.parsed_onnx)

        module.ILogger, module.Logger, module.Builder, module.OnnxParser, module.Runtime = ILogger, Logger, Builder, OnnxParser, Runtime
        for kind, enum in enums.items():
            setattr(module, kind, enum)
        return module
