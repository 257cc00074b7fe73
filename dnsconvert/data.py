"""Training data: MNIST from its four IDX files, or built-in synthetic digits for offline use.

Where MNIST comes from, in order: ``--data DIR``; ``$DNSCONVERT_MNIST``; the cache
(``$XDG_CACHE_HOME/dnsconvert/mnist``), downloaded into it when a network exists. ``synthetic``
selects the built-in set: seven-segment digit glyphs, jittered and noised, generated from a
seed in well under a second. It needs no file and no network, so the quick start runs on a
fresh offline machine; it is learnable but far easier than MNIST, so it is only for
smoke tests and demos, never for accuracy claims.
"""

from __future__ import annotations

import hashlib
import os
import struct
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import limits
from ._atomic import write_bytes_atomic
from .errors import DataError

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "cfeddb84311ecf044fc6a5b0f6ee8a24d265d4e83e388400186eb114082f4209",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "train-images-idx3-ubyte.gz": "db8f937d487057fb14a9f0fbe97f0bc8d311ab41b750d41e1ff37c43b9e55e19",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class ImageDataset:
    """Images as uint8 ``[N, 1, H, W]`` and int64 labels; normalised per batch on the fly."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str

    def __len__(self) -> int:
        return int(self.labels.numel())

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
        return x, self.labels[index]


@dataclass
class DataSplits:
    train: ImageDataset
    test: ImageDataset
    source: str


_IDX_CHUNK = 1 << 20


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a uint8 array.

    The header's dims fix the data size before anything is allocated: that size is held to
    the ``dense_bytes`` limit, and a gzip file is inflated as a stream that stops at the size
    the header states (a small gzip cannot inflate to gigabytes).
    """
    try:
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == b"\x1f\x8b"
            fh.seek(0)
            stream = _GzipStream(fh, path) if gzipped else fh
            header = _read_exactly(stream, 4, path, "header")
            zero, dtype_code, ndim = struct.unpack(">HBB", header)
            if zero != 0 or dtype_code != 0x08:
                raise DataError(f"not an unsigned-byte IDX file (magic {header.hex()})", path=path, hint="MNIST IDX files start with 00 00 08 0N")
            if not 1 <= ndim <= 4:
                raise DataError(f"IDX header says {ndim} dimensions; MNIST files have 1 (labels) or 3 (images)", path=path)
            dims = struct.unpack(f">{ndim}I", _read_exactly(stream, 4 * ndim, path, "header"))
            size = limits.numel(dims)
            limits.check("dense_bytes", size, f"IDX data of shape {list(dims)}", path=path)
            body = _read_exactly(stream, size, path, "data")
            if stream.read(1):
                raise DataError(f"holds more data than its header's shape {list(dims)}", path=path, hint="the file is corrupt")
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror or exc})", path=path, hint="re-download the MNIST files") from None
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _read_exactly(stream, size: int, path: Path, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise DataError(f"IDX {what} ends after {len(data)} of {size} bytes", path=path, hint="the file is truncated; re-download it")
    return data


class _GzipStream:
    """A gzip file inflated on demand, never more than asked for (``read(n)`` returns <= n bytes)."""

    def __init__(self, fh, path: Path):
        self.fh, self.path = fh, path
        self.inflater = zlib.decompressobj(wbits=31)
        self.pending = b""

    def read(self, size: int) -> bytes:
        parts, wanted = [], size
        while wanted > 0:
            if not self.pending:
                if self.inflater.eof:
                    break
                self.pending = self.fh.read(_IDX_CHUNK)
                if not self.pending:
                    raise DataError("gzip stream is truncated", path=self.path, hint="re-download the file")
            try:
                out = self.inflater.decompress(self.pending, min(wanted, _IDX_CHUNK))
            except zlib.error as exc:
                raise DataError(f"gzip data is corrupt ({exc})", path=self.path, hint="re-download the file") from None
            self.pending = self.inflater.unconsumed_tail or (self.inflater.unused_data if self.inflater.eof else b"")
            if self.inflater.eof and self.pending:
                raise DataError("holds data after its gzip stream", path=self.path, hint="the file is corrupt")
            parts.append(out)
            wanted -= len(out)
        return b"".join(parts)


def _find(directory: Path, filename: str) -> Path | None:
    for candidate in (directory / filename, directory / filename.removesuffix(".gz")):
        if candidate.exists():
            return candidate
    return None


def load_mnist(directory: str | Path) -> DataSplits:
    """The four IDX files from ``directory`` (gzipped or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("is not a directory of MNIST IDX files", path=directory, hint="pass the folder holding train-images-idx3-ubyte.gz etc.")
    arrays = {}
    for key, filename in MNIST_FILES.items():
        path = _find(directory, filename)
        if path is None:
            raise DataError(f"{filename} is missing", path=directory, hint="the folder needs all four MNIST IDX files")
        arrays[key] = read_idx(path)
    splits = []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{part} images {images.shape} and labels {labels.shape} do not match", path=directory)
        if images.shape[1:] != (28, 28) or len(images) == 0:
            raise DataError(f"{part} images have shape {images.shape}; MNIST holds one or more 28x28 images", path=directory)
        if int(labels.max()) > 9:
            raise DataError(f"{part} labels hold {int(labels.max())}; MNIST labels are 0..9", path=directory, hint="the label file is corrupt")
        splits.append(ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), f"mnist-{part}"))
    return DataSplits(splits[0], splits[1], f"mnist:{directory}")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dnsconvert" / "mnist"


def download_mnist(directory: Path, timeout: float = 10.0) -> bool:
    """Fetch the four files into ``directory`` (sha256-checked, atomic); False if no network."""
    for filename, digest in MNIST_SHA256.items():
        if (directory / filename).exists():
            continue
        for mirror in MNIST_MIRRORS:
            try:
                with urllib.request.urlopen(mirror + filename, timeout=timeout) as response:  # noqa: S310 - fixed https URL
                    data = response.read()
            except OSError:
                continue
            if hashlib.sha256(data).hexdigest() == digest:
                write_bytes_atomic(directory / filename, data)
                break
        else:
            return False
    return True


_SEGMENTS = {  # seven-segment layout: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle
    0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}  # fmt: skip


def synthetic_digits(n_train: int = 12_000, n_test: int = 2_000, seed: int = 0) -> DataSplits:
    """Seven-segment digits (28×28) with random shift, stroke width, missing pixels and noise."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> ImageDataset:
        labels = rng.integers(0, 10, size=n)
        images = np.zeros((n, 28, 28), dtype=np.float32)
        for i, label in enumerate(labels):
            dx, dy = rng.integers(-4, 5, size=2)
            w = int(rng.integers(2, 4))
            top, left, height, width = 4 + dy, 8 + dx, 10, 10
            boxes = {
                "a": (top, left, w, width), "g": (top + height, left, w, width), "d": (top + 2 * height - w, left, w, width),
                "f": (top, left, height, w), "b": (top, left + width - w, height, w),
                "e": (top + height, left, height, w), "c": (top + height, left + width - w, height, w),
            }  # fmt: skip
            for segment in _SEGMENTS[int(label)]:
                r, c, h, ww = boxes[segment]
                images[i, max(r, 0) : max(r + h, 0), max(c, 0) : max(c + ww, 0)] = 1.0
        images *= rng.random(images.shape) > 0.1
        images += rng.normal(0.0, 0.15, images.shape)
        pixels = np.clip(images * 255.0, 0, 255).astype(np.uint8)
        return ImageDataset(torch.from_numpy(pixels).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), "synthetic")

    return DataSplits(make(n_train), make(n_test), f"synthetic(seed={seed})")


def resolve_data(spec: str | Path | None = "auto", *, allow_download: bool = True) -> DataSplits:
    """``synthetic``, a directory, or ``auto`` (env, cache, download, else synthetic)."""
    text = str(spec) if spec is not None else "auto"
    if text == "synthetic":
        return synthetic_digits()
    if text not in ("auto", "mnist"):
        return load_mnist(Path(text))
    env = os.environ.get("DNSCONVERT_MNIST")
    if env:
        return load_mnist(Path(env))
    cache = cache_dir()
    if all(_find(cache, f) for f in MNIST_FILES.values()):
        return load_mnist(cache)
    if allow_download and download_mnist(cache):
        return load_mnist(cache)
    if text == "mnist":
        raise DataError("MNIST not found and could not be downloaded", hint="pass --data DIR with the four IDX files or set DNSCONVERT_MNIST")
    return synthetic_digits()
