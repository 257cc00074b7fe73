"""Local Hugging Face ``transformers`` models: ``--model hf:DIR`` and a model directory as a checkpoint.

A model directory is what ``save_pretrained`` writes: ``config.json`` and safetensors
weights (``model.safetensors``, or shards listed in ``model.safetensors.index.json``). It is
read offline (``local_files_only``), in float32, and only with transformers' own classes: the
class named by ``config.architectures`` when transformers has it, else ``AutoModel``. Remote
code (``trust_remote_code``, a config's ``auto_map``) is never run and pickled weights
(``pytorch_model.bin``) are never read, so an ``hf:`` model needs no ``--trust-model-code``:
nothing outside dnsconvert and transformers runs.

The model spec is ``dnsconvert.hf:pretrained`` with the directory's absolute path (and any
``--model-kwargs``, which override config attributes, e.g. ``{"attn_implementation": "eager"}``).
Its inputs default to ``input_ids`` and ``attention_mask``: int64 ``[batch, seq]`` with a
dynamic batch (1..4096) and sequence (1..the config's maximum positions), token ids in
``0..vocab_size``, an all-ones mask (what a tokenizer gives an unpadded batch), passed by
keyword. ``--input`` replaces them (they are passed by keyword too). ``use_cache`` is off,
so a causal LM returns its logits and no key/value cache.

``transformers`` is an optional dependency: ``pip install dnsconvert[hf]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import ModelSpecError
from .modelspec import DEFAULT_BATCH_MAX, Dim, InputSpec, ModelSpec

PREFIX = "hf:"
FACTORY = "dnsconvert.hf:pretrained"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SEQ_OPT = 32
DEFAULT_SEQ_MAX = 512  # when the config states no maximum positions
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def is_hf_model(text: str | None) -> bool:
    return bool(text) and str(text).startswith(PREFIX)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelSpecError("hf: models need the transformers package", hint="pip install 'dnsconvert[hf]'") from None
    return transformers


# -- the directory --------------------------------------------------------------------------------
def model_directory(path: str | Path) -> Path:
    """``path`` as an absolute model directory, checked: config.json and safetensors weights."""
    directory = Path(path).expanduser().resolve()
    if not directory.is_dir():
        raise ModelSpecError("is not a directory", path=directory, hint="hf:DIR names the folder save_pretrained wrote (config.json + model.safetensors)")
    if not (directory / "config.json").is_file():
        raise ModelSpecError("has no config.json, so it is not a transformers model directory", path=directory, hint="save the model with model.save_pretrained(DIR)")
    if not (directory / WEIGHTS).is_file() and not (directory / INDEX).is_file():
        pickled = [p.name for p in directory.glob("pytorch_model*.bin")]
        detail = f" (it has {', '.join(pickled)}: pickles, which dnsconvert never loads)" if pickled else ""
        raise ModelSpecError(
            f"holds no safetensors weights{detail}",
            path=directory,
            hint="re-save with model.save_pretrained(DIR) (safetensors is the default)",
        )
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    """config.json as plain JSON (no transformers import, no code)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"config.json cannot be read ({exc})", path=directory) from None
    if not isinstance(config, dict):
        raise ModelSpecError("config.json is not a JSON object", path=directory)
    return config


def model_files(path: str | Path) -> list[Path]:
    """The files a model directory's model is made of: config.json and its safetensors weights."""
    directory = model_directory(path)
    files = [directory / "config.json"]
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text()).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise ModelSpecError(f"{INDEX} cannot be read ({exc})", path=directory) from None
        files.append(directory / INDEX)
        for shard in shards:
            shard_path = (directory / str(shard)).resolve()
            if shard_path.parent != directory or not shard_path.is_file():
                raise ModelSpecError(f"{INDEX} names shard {shard!r}, which is not a file in the directory", path=directory)
            files.append(shard_path)
    else:
        files.append(directory / WEIGHTS)
    return files


def directory_sha256(path: str | Path) -> str:
    """One digest of a model directory: its files' names and contents."""
    from ._atomic import sha256_file

    directory = model_directory(path)
    digest = hashlib.sha256()
    for file in model_files(directory):
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


# -- the spec -------------------------------------------------------------------------------------
def default_inputs(config: dict[str, Any], *, where: Path | None = None) -> tuple[InputSpec, ...]:
    """``input_ids`` and ``attention_mask`` from the config's vocabulary and maximum positions."""
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise ModelSpecError(
            "config.json has no vocab_size, so the model's inputs are not token ids dnsconvert can guess",
            path=where,
            hint="declare them: --input pixel_values:batch=1..1..64,3,224,224 (repeatable)",
        )
    max_positions = next((config[k] for k in _MAX_POSITION_KEYS if isinstance(config.get(k), int) and not isinstance(config.get(k), bool) and config[k] > 0), DEFAULT_SEQ_MAX)
    batch = Dim(1, 1, DEFAULT_BATCH_MAX, "batch")
    seq = Dim(1, min(DEFAULT_SEQ_OPT, max_positions), max_positions, "seq")
    return (
        InputSpec("input_ids", (batch, seq), "int64", 0, float(vocab), keyword=True),
        InputSpec("attention_mask", (batch, seq), "int64", 1, 2, keyword=True),
    )


def hf_spec(path: str | Path, *, inputs: Sequence[InputSpec] = (), input_shape: Sequence[int] | None = None, **overrides: Any) -> ModelSpec:
    """The ModelSpec of the model directory ``path`` (``overrides``: config attributes)."""
    if input_shape:
        raise ModelSpecError("an hf: model takes named inputs, not --input-shape", hint="use --input NAME:SHAPE[:DTYPE[:LOW..HIGH]]")
    directory = model_directory(path)
    config = read_config(directory)
    if inputs:
        inputs = tuple(InputSpec(i.name, i.shape, i.dtype, i.low, i.high, keyword=True) for i in inputs)
    else:
        inputs = default_inputs({**config, **overrides}, where=directory)
    return ModelSpec(FACTORY, {"path": str(directory), **overrides}, inputs=tuple(inputs))


def check_parameters(spec: ModelSpec, count: int, *, source: str | Path | None = None) -> None:
    """An hf: model may have as many parameters as its weight files back (a byte each at least),
    or else as many as the general ``parameters`` limit allows: a config.json cannot ask for a
    model far larger than the weights beside it before anything is allocated."""
    from . import limits

    backed = sum(f.stat().st_size for f in model_files(spec.kwargs.get("path", "")) if f.suffix == ".safetensors")
    if count <= max(limits.get("parameters"), backed):
        return
    limits.check("parameters", count, f"the model its config.json describes ({backed:,} bytes of weights beside it)", path=source or spec.kwargs.get("path"))


# -- building -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """transformers' progress bars and config warnings off while dnsconvert loads a model."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def model_class(config: Any, *, where: Path | None = None) -> Any:
    """transformers' class for ``config``: its ``architectures[0]`` if transformers has that
    class, else ``AutoModel``; a name that is not one of transformers' own model classes is refused."""
    transformers = _transformers()
    names = getattr(config, "architectures", None) or []
    if not names:
        return transformers.AutoModel
    name = names[0]
    cls = getattr(transformers, str(name), None) if str(name).isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and cls.__module__.startswith("transformers.")):
        raise ModelSpecError(
            f"config.json names architecture {name!r}, which is not a model class of transformers {transformers.__version__}",
            path=where,
            hint="dnsconvert loads only transformers' own classes and never remote code; "
            "remove 'architectures' to load AutoModel, or build the model yourself (--model pkg.module:factory --trust-model-code)",
        )
    return cls


def pretrained(path: str, **overrides: Any):
    """The model in ``path`` (the ``hf:`` factory): config and safetensors weights, float32, offline.

    Under a meta device (a rebuild whose weights come from a checkpoint) only the config is
    read: transformers refuses to load weights onto meta, and they would be replaced anyway.
    """
    import torch

    transformers = _transformers()
    directory = model_directory(path)
    overrides.setdefault("use_cache", False)
    with _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False, **overrides)
            cls = model_class(config, where=directory)
            if torch.get_default_device().type == "meta":
                return cls.from_config(config) if cls is transformers.AutoModel else cls(config)
            return cls.from_pretrained(
                str(directory), config=config, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
            )
        except ModelSpecError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ModelSpecError(f"transformers cannot load this model ({first})", path=directory) from None


def has_vocab(directory: Path) -> bool:
    vocab = read_config(directory).get("vocab_size")
    return isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0
