"""A fast GGUF header reader: metadata key/values and tensor descriptors, tensors left on disk.

`gguf.GGUFReader` builds a numpy view per metadata element, which takes 5-10 s for a vocabulary of
250k tokens; this reader walks the header once with `struct` and reads numeric arrays in one
`numpy.frombuffer` each, so opening a file costs well under a second. Tensor data stays in a
read-only memory map and is dequantized one tensor at a time by `read_tensor`.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key/value
count, the key/values, the tensor descriptors (name, dims innermost-first, ggml type, offset), then
the tensor data, aligned to `general.alignment` (32 by default).
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value type -> (struct format, numpy dtype); 8 is a string, 9 an array.
_SCALAR_TYPES: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"),
    4: ("<I", "<u4"), 5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"),
    10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")
VOCABULARY_KEYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                             "tokenizer.ggml.token_type"})


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/torch order (outermost first), i.e. GGUF dims reversed
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return self.num_elements // block_size * type_size


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> value) and `tensors` (name -> descriptor)."""

    def __init__(self, path: str | Path, *, metadata_only: bool = False) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as file:
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._data = np.frombuffer(self._map, dtype=np.uint8)
        self._pos = 0
        if bytes(self._data[:4]) != _MAGIC:
            raise GGUFFormatError(f"{self.path} is not a GGUF file (missing the 'GGUF' magic)")
        self._pos = 4
        self.version = self._unpack("<I")
        if self.version not in _SUPPORTED_VERSIONS:
            raise GGUFFormatError(
                f"{self.path}: GGUF version must be one of {_SUPPORTED_VERSIONS}, got {self.version}"
            )
        tensor_count = self._unpack("<Q")
        kv_count = self._unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._read_string()
            self.metadata[key] = self._read_value(self._unpack("<I"))
        self._metadata_end = self._pos
        self.tensors: dict[str, GGUFTensorInfo] = {}
        if metadata_only:
            return
        descriptors = [self._read_tensor_descriptor() for _ in range(tensor_count)]
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        for name, shape, ggml_type, offset in descriptors:
            info = GGUFTensorInfo(name, shape, ggml_type, data_start + offset)
            if info.offset + info.num_bytes > len(self._data):
                raise GGUFFormatError(f"{self.path}: tensor {name} extends past the end of the file (truncated?)")
            self.tensors[name] = info

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFFormatError(f"{self.path}: metadata has no general.architecture")
        return arch

    def metadata_digest(self) -> str:
        """SHA-256 of the header up to the end of the key/values: names what the file says, vocabulary included."""
        return hashlib.sha256(memoryview(self._data[:self._metadata_end])).hexdigest()

    def read_tensor(self, name: str) -> np.ndarray:
        """The tensor `name` dequantized to a float32 array of its logical shape."""
        info = self.tensors[name]
        raw = self._data[info.offset : info.offset + info.num_bytes]
        if info.ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return dequantize(raw, info.ggml_type).reshape(info.shape)
        if info.ggml_type == GGMLQuantizationType.BF16:
            # bfloat16 is the upper half of a float32: widen by shifting into the high bits.
            halves = raw.view(np.uint16).astype(np.uint32) << 16
            return halves.view(np.float32).reshape(info.shape)
        return dequantize(self.read_raw(name), info.ggml_type).reshape(info.shape)

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor's blocks as stored, a read-only view of the memory map: uint8 [..., bytes per row]."""
        info = self.tensors[name]
        block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
        row_bytes = info.shape[-1] // block_size * type_size
        return self._data[info.offset : info.offset + info.num_bytes].reshape(*info.shape[:-1], row_bytes)

    def drop_vocabulary(self) -> None:
        """Forget the tokenizer's arrays (tokens, merges, scores, token types) once they have served.

        They are 100k Python strings for a 49k vocabulary, ~10 MB that would otherwise stay resident
        for as long as the file is open, i.e. until the last weight is loaded."""
        for key in VOCABULARY_KEYS:
            self.metadata.pop(key, None)

    def release_pages(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident memory once it has been repacked.

        Mapped file pages count in the process's RSS for as long as the map lives, so reading every
        tensor of a 100 MB file would keep 100 MB resident until the last layer is loaded. The pages
        stay in the OS page cache and are simply read again if the tensor is ever touched (the map is
        read-only, so nothing is lost). A no-op where `madvise` is unavailable."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        info = self.tensors[name]
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        stop = min(info.offset + info.num_bytes, len(self._map))
        self._map.madvise(advice, start, stop - start)

    # -- header parsing ---------------------------------------------------------------------

    def _unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += size
        return value

    def _read_string(self) -> str:
        return self._read_strings(1)[0]

    def _read_strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary and its merges are 100k of them, so one tight loop),
        each a u64 length and its bytes, taken straight from the map (no numpy view per string)."""
        data, pos, strings = self._map, self._pos, []
        read_length = _LENGTH.unpack_from
        for _ in range(count):
            (length,) = read_length(data, pos)
            # Some vocabularies hold invalid UTF-8 (partial byte tokens); keep them readable.
            strings.append(data[pos + 8 : pos + 8 + length].decode("utf-8", errors="replace"))
            pos += 8 + length
        self._pos = pos
        return strings

    def _read_value(self, value_type: int) -> Any:
        if value_type in _SCALAR_TYPES:
            return self._unpack(_SCALAR_TYPES[value_type][0])
        if value_type == _STRING:
            return self._read_string()
        if value_type == _ARRAY:
            item_type = self._unpack("<I")
            count = self._unpack("<Q")
            if item_type in _SCALAR_TYPES:
                dtype = np.dtype(_SCALAR_TYPES[item_type][1])
                values = np.frombuffer(self._data, dtype=dtype, count=count, offset=self._pos)
                self._pos += count * dtype.itemsize
                return values.tolist()
            if item_type == _STRING:
                return self._read_strings(count)
            return [self._read_value(item_type) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown metadata value type {value_type} at byte {self._pos}")

    def _read_tensor_descriptor(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._read_string()
        n_dims = self._unpack("<I")
        dims = [self._unpack("<Q") for _ in range(n_dims)]
        type_id = self._unpack("<I")
        offset = self._unpack("<Q")
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFFormatError(f"{self.path}: tensor {name} has unknown ggml type {type_id}") from None
        return name, tuple(reversed(dims)), ggml_type, offset
