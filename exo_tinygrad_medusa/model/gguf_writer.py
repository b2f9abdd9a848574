"""Write a whole GGUF v3 file (metadata key-values, tensor infos, tensor data) from Python values and GGML blocks.

For files made rather than converted: random-weight models of a real model's shape for benchmarks, tiny models for
tests. requantize.py rewrites an existing file instead and keeps its metadata bytes as they are.

Metadata values are typed the way llama.cpp's converter types them, since llama.cpp refuses a key of the wrong type:
a Python int is a uint32 (ids, counts, lengths), a float a float32, a list of ints an int32 array (token types);
numpy scalars and arrays keep their own type."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..kernels.packed import GGML_BLOCKS, ggml_nbytes

F32, F16 = 0, 1
_FLOAT_BYTES = {F32: 4, F16: 2}
_STRING, _ARRAY = 8, 9
# numpy scalar type -> (GGUF value type, struct format)
_NUMPY = {np.dtype(np.uint8): (0, "B"), np.dtype(np.int8): (1, "b"), np.dtype(np.uint16): (2, "H"),
          np.dtype(np.int16): (3, "h"), np.dtype(np.uint32): (4, "I"), np.dtype(np.int32): (5, "i"),
          np.dtype(np.float32): (6, "f"), np.dtype(np.uint64): (10, "Q"), np.dtype(np.int64): (11, "q"),
          np.dtype(np.float64): (12, "d")}


@dataclass
class GGUFTensor:
    """One tensor of the file. shape is numpy's order ([out, in] for a matrix; GGUF stores it reversed). data: the
    tensor's bytes (float32 / float16 values, or GGML blocks row after row), or a function returning them, called
    while writing so that a large model is never held in memory at once."""
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    data: bytes | np.ndarray | Callable[[], "bytes | np.ndarray"]

    @property
    def nbytes(self) -> int:
        count = int(np.prod(self.shape))
        if self.ggml_type in _FLOAT_BYTES:
            return _FLOAT_BYTES[self.ggml_type] * count
        if self.ggml_type not in GGML_BLOCKS:
            raise ValueError(f"{self.name}: GGML type {self.ggml_type} cannot be written")
        if self.shape[-1] % GGML_BLOCKS[self.ggml_type][0]:
            raise ValueError(f"{self.name}: rows of {self.shape[-1]} are not whole blocks of GGML type {self.ggml_type}")
        return ggml_nbytes(self.ggml_type, count)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _scalar(value) -> tuple[int, bytes]:
    """(GGUF value type, encoded bytes) of one scalar."""
    if isinstance(value, (bool, np.bool_)):
        return 7, struct.pack("<?", bool(value))
    if isinstance(value, str):
        return _STRING, _string(value)
    if isinstance(value, np.generic):
        kind, fmt = _NUMPY[value.dtype]
        return kind, struct.pack("<" + fmt, value)
    if isinstance(value, int):
        return (4, struct.pack("<I", value)) if 0 <= value < 2 ** 32 else (11, struct.pack("<q", value))
    if isinstance(value, float):
        return 6, struct.pack("<f", value)
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _value(value) -> tuple[int, bytes]:
    if isinstance(value, np.ndarray):
        kind, _ = _NUMPY[value.dtype]
        return _ARRAY, struct.pack("<IQ", kind, value.size) + value.astype(value.dtype.newbyteorder("<")).tobytes()
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) for v in value):
            return _ARRAY, struct.pack("<IQ", _STRING, len(value)) + b"".join(_string(v) for v in value)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            return _value(np.asarray(value, dtype=np.int32))
        if all(isinstance(v, (int, float)) for v in value):
            return _value(np.asarray(value, dtype=np.float32))
        raise TypeError("GGUF metadata arrays hold strings or numbers of one kind")
    return _scalar(value)


def write_gguf(path: str | Path, metadata: dict, tensors: list[GGUFTensor], alignment: int = 32) -> None:
    """Write a GGUF v3 file: `metadata` (key -> value, typed as the module says) then `tensors`, each one's data
    aligned to `alignment` bytes (recorded as general.alignment when it is not GGUF's default 32)."""
    if alignment != 32:
        metadata = {**metadata, "general.alignment": alignment}
    header = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        kind, raw = _value(value)
        header += [_string(key), struct.pack("<I", kind), raw]
    write_gguf_head(path, b"".join(header), tensors, alignment)


def write_gguf_head(path: str | Path, head: bytes, tensors: list[GGUFTensor], alignment: int = 32) -> None:
    """Write a GGUF file from `head` (magic, version, counts and metadata, as encoded: requantize.py keeps a source
    file's) followed by the tensor infos and each tensor's data, aligned to `alignment` bytes."""
    infos, offset = [], 0
    for t in tensors:
        infos += [_string(t.name), struct.pack(f"<I{len(t.shape)}Q", len(t.shape), *reversed(t.shape)),
                  struct.pack("<IQ", t.ggml_type, offset)]
        offset += -(-t.nbytes // alignment) * alignment
    head = head + b"".join(infos)
    with open(path, "wb") as f:
        f.write(head + bytes(-len(head) % alignment))
        for t in tensors:
            data = t.data() if callable(t.data) else t.data
            raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
            if len(raw) != t.nbytes:
                raise ValueError(f"{t.name}: {len(raw)} bytes of data, its shape and type need {t.nbytes}")
            f.write(raw + bytes(-len(raw) % alignment))
