"""Stand-in ``tensorrt`` modules exposing exactly one generation's documented Python surface.

TensorRT cannot be installed here, so the builder is run against these: every class has only
the attributes listed for its generation in ``SURFACES`` (anything else raises AttributeError,
as a missing pybind11 binding does), every call is recorded, and the engine inspector returns
the recorded layer-information samples. They stand in for what cannot exist on this machine
(TensorRT, a GPU); the code around them (plans, ONNX precision, parsing, reports) is real.
"""

from __future__ import annotations

import types
from typing import Any

import onnx

# The Python API the plugin may use, per generation, with where each part is documented.
# 10.x: TensorRT 10.x Python API reference (docs.nvidia.com/deeplearning/tensorrt/10.x, pages
#   Core/Builder, Core/BuilderConfig, Core/Runtime, Core/EngineInspector, Core/TimingCache,
#   Parsers/Onnx) and the bindings in NVIDIA/TensorRT python/src/infer/pyCore.cpp
#   (.def("set_timing_cache", &IBuilderConfig::setTimingCache, "cache"_a, "ignore_mismatch"_a)
#   returns bool; .def("get_timing_cache", ...)); ICudaEngine name-based I/O per the 10.0
#   C++ reference (getTensorShape, getTensorDataType, getTensorIOMode).
# 11.x: TensorRT 11.0-11.4 Python API reference (Core/Builder 11.0: NetworkDefinitionCreationFlag
#   is STRONGLY_TYPED "[DEPRECATED] ... always enabled ... ignored", PREFER_AOT/JIT_PYTHON_PLUGINS;
#   Builder variables no longer list platform_has_*), and "Migrating Python Code from TensorRT
#   10.x to 11.x", Removed Python APIs: BuilderFlag.FP16/INT8/FP8/BF16/INT4/FP4,
#   OBEY/PREFER_PRECISION_CONSTRAINTS, DIRECT_IO, IBuilderConfig.int8_calibrator,
#   set/get_calibration_profile, quantization flags; C++ list: platformHasFastFp16/Int8 removed;
#   ILayer precision / output types removed with weak typing. BuilderFlag.TF32 and
#   SPARSE_WEIGHTS remain; IEngineInspector remains (JSON schema changed).
_COMMON = {
    "module": ["__version__", "ILogger", "Logger", "Builder", "OnnxParser", "Runtime", "BuilderFlag", "NetworkDefinitionCreationFlag",
               "MemoryPoolType", "ProfilingVerbosity", "LayerInformationFormat", "TensorIOMode", "DataType"],
    "ILogger.Severity": ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"],
    "Builder": ["create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network"],
    "IBuilderConfig": ["set_memory_pool_limit", "profiling_verbosity", "set_flag", "clear_flag", "add_optimization_profile",
                       "create_timing_cache", "set_timing_cache", "get_timing_cache"],
    "OnnxParser": ["parse", "num_errors", "get_error"],
    "IOptimizationProfile": ["set_shape"],
    "Runtime": ["deserialize_cuda_engine"],
    "ICudaEngine": ["create_engine_inspector", "num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "create_execution_context"],
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
                 timing_cache_none: bool = False, log_messages: tuple[tuple[str, str], ...] = ()) -> None:  # fmt: skip
        self.generation = generation
        self.surface = SURFACES[generation]
        self.recorder = Recorder()
        self.layer_info = layer_info
        self.accept_cache = accept_cache
        self.timing_cache_none = timing_cache_none
        self.log_messages = log_messages
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

        class Logger(ILogger):
            WARNING = severity.WARNING

            def __init__(self, min_severity=None) -> None:
                self.min_severity = min_severity

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

        class Engine(Surface):
            _kind = "ICudaEngine"

            def create_engine_inspector(self):
                rec.call("ICudaEngine.create_engine_inspector")
                return Inspector(fake)

        class Runtime(Surface):
            _kind = "Runtime"

            def __init__(self, logger) -> None:
                super().__init__(fake)

            def deserialize_cuda_engine(self, data: bytes):
                rec.call("Runtime.deserialize_cuda_engine")
                return Engine(fake)

        module.ILogger, module.Logger, module.Builder, module.OnnxParser, module.Runtime = ILogger, Logger, Builder, OnnxParser, Runtime
        for kind, enum in enums.items():
            setattr(module, kind, enum)
        return module
