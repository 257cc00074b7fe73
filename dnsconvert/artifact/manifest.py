"""The artifact manifest: one typed, versioned record, read and written only here.

An artifact is a folder: its files plus ``manifest.json``, which names every file with its
sha256 and size, the checkpoint it was built from, the model's inputs and outputs, parity
and the target's own facts. The types below are frozen dataclasses validated by pydantic on
read (types, known keys, sizes); a target keeps its own facts in ``details`` and reads them
back through its own record type with :meth:`Manifest.details_as`, so no code outside this
module reads a manifest by string keys.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from ..errors import UserError
from ..modelspec import ModelSpec

MANIFEST_VERSION = 2
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
# A file's name inside its artifact folder: no separators, no "..", no hidden names.
FILE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$"
SHA256 = r"^[0-9a-f]{64}$"

_STRICT = ConfigDict(extra="forbid", strict=True)
T = TypeVar("T")


@dataclass(frozen=True, config=_STRICT)
class FileRecord:
    path: Annotated[str, Field(pattern=FILE_NAME)]
    sha256: Annotated[str, Field(pattern=SHA256)]
    bytes: Annotated[int, Field(ge=0)]


@dataclass(frozen=True, config=_STRICT)
class SourceRecord:
    """The checkpoint an artifact was built from."""

    checkpoint: Annotated[str, Field(max_length=4096)] | None = None
    sha256: Annotated[str, Field(pattern=SHA256)] | None = None


@dataclass(frozen=True, config=_STRICT)
class OutputParity:
    name: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclass(frozen=True, config=_STRICT)
class ParityReport:
    """The artifact's outputs against the PyTorch model's on the same inputs."""

    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    batches: tuple[int, ...]
    passed: bool
    outputs: tuple[OutputParity, ...] = ()
    problem: str | None = None  # why outputs could not be compared (count or shape differ)

    def to_json(self) -> dict[str, Any]:
        return _adapter(ParityReport).dump_python(self, mode="json")


@dataclass(frozen=True, config=_STRICT)
class LayerRecord:
    """One pruned weight as the artifact stores it."""

    param: str
    initializer: str
    shape: tuple[int, ...]
    sparsity: float
    nnz: int
    stored_sparse: bool
    dense_bytes: int
    sparse_bytes: int


@dataclass(frozen=True, config=_STRICT)
class GraphNMRecord:
    """2:4 on the exported graph, along the reduction axis its consumer op uses."""

    initializer: str
    op: str
    reduction_axis: int
    compliant: bool | None
    violating_groups: int
    skipped: str | None


@dataclass(frozen=True, config=_STRICT)
class SizeRecord:
    sparse_bytes: int
    dense_bytes: int
    ratio: float


@dataclass(frozen=True, config=_STRICT)
class Manifest:
    """Everything an artifact says about itself. ``files`` maps a role (``sparse``, ``dense``,
    or a target's own, e.g. ``build_log``) to a file in the artifact folder."""

    target: Annotated[str, Field(min_length=1, max_length=200)]
    format: Annotated[str, Field(max_length=200)]
    files: dict[Annotated[str, Field(pattern=r"^[a-z0-9_]{1,64}$")], FileRecord]
    model: dict[str, Any] | None
    source: SourceRecord
    outputs: tuple[str, ...] = ()
    parity: ParityReport | None = None
    layers: tuple[LayerRecord, ...] = ()
    graph_2_4: tuple[GraphNMRecord, ...] = ()
    sizes: SizeRecord | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    tools: dict[str, str] = Field(default_factory=dict)
    kind: Literal["dnsconvert-artifact"] = "dnsconvert-artifact"
    manifest_version: Literal[2] = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if len(self.files) > 64:
            raise ValueError("an artifact names at most 64 files")
        seen: dict[str, FileRecord] = {}
        for record in self.files.values():  # two roles may share a file, with one record
            if seen.setdefault(record.path, record) != record:
                raise ValueError(f"file {record.path} is listed twice with different hashes or sizes")
        if MANIFEST_NAME in {r.path for r in self.files.values()}:
            raise ValueError(f"{MANIFEST_NAME} cannot be one of the artifact's files")

    @property
    def model_spec(self) -> ModelSpec | None:
        return None if self.model is None else ModelSpec.from_json(self.model)

    def details_as(self, record_type: type[T]) -> T:
        """The target's own facts as its record type (validated like the rest)."""
        try:
            return _adapter(record_type).validate_python(self.details)
        except ValidationError as exc:
            raise UserError(f"manifest details do not fit {record_type.__name__}: {_first_error(exc)}", hint="re-run dnsconvert export") from None

    def to_json(self) -> dict[str, Any]:
        return _adapter(Manifest).dump_python(self, mode="json")

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()


def read_manifest(path: Path) -> Manifest:
    """Read and validate ``path`` (a manifest.json); any fault is a UserError naming it."""
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise UserError(f"manifest is {size:,} bytes, over the {MAX_MANIFEST_BYTES:,}-byte limit", path=path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError("no such artifact manifest", path=path, hint="pass the folder written by dnsconvert export") from None
    except IsADirectoryError:
        raise UserError("is a directory, expected a manifest.json", path=path) from None
    except OSError as exc:
        raise UserError(f"cannot read the manifest ({exc.strerror})", path=path) from None
    try:
        manifest = _adapter(Manifest).validate_json(data)
    except ValidationError as exc:
        raise UserError(f"not a valid dnsconvert artifact manifest: {_first_error(exc)}", path=path, hint="re-run dnsconvert export") from None
    except ValueError as exc:
        raise UserError(f"not a valid dnsconvert artifact manifest: {exc}", path=path, hint="re-run dnsconvert export") from None
    try:
        manifest.model_spec  # noqa: B018 - validates the model spec once, here
    except UserError as exc:
        raise UserError(f"manifest's model spec is malformed: {exc.message}", path=path) from None
    return manifest


def source_record(ckpt: Any) -> SourceRecord:
    source = getattr(ckpt, "source", None)
    return SourceRecord(str(source) if source else None, getattr(ckpt, "source_sha256", None))


def tool_versions(*extra: str) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("dnsconvert", "torch", "onnx", "onnxruntime", *extra):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def records(record_type: type[T], items: Any) -> tuple[T, ...]:
    """Validate a list of plain dicts as records (for targets building their details)."""
    return _adapter(tuple[record_type, ...]).validate_python(tuple(items))


def to_plain(record: Any) -> Any:
    """A record (or a mapping/list of them) as plain JSON values, for ``details``."""
    if isinstance(record, Mapping):
        return {k: to_plain(v) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [to_plain(v) for v in record]
    if hasattr(record, "__pydantic_fields__"):
        return _adapter(type(record)).dump_python(record, mode="json")
    return record


_ADAPTERS: dict[Any, TypeAdapter] = {}


def _adapter(kind: Any) -> TypeAdapter:
    if kind not in _ADAPTERS:
        _ADAPTERS[kind] = TypeAdapter(kind)
    return _ADAPTERS[kind]


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ())) or "(top level)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {error.get('msg', 'invalid')}{more}"
