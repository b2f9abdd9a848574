"""Read the key/value header of a GGUF file without touching tensor data.

A small struct-based reader rather than tinygrad's: it only needs a file handle (no Tensor/device),
and it unpacks numeric arrays in one call, which keeps a 50k-entry vocabulary fast to read.
"""
import os
import struct
from typing import Any, BinaryIO

# GGUF value type id -> struct format of one element (8 = string and 9 = array are handled separately)
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; v2 and v3 share this layout


class _Reader:
    def __init__(self, f: BinaryIO, path: str):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError(f"{self.path}: truncated GGUF header")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        # token strings may hold invalid UTF-8 in some conversions; do not fail the whole header on them
        return self.read(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, typ: int) -> Any:
        if typ == 8:
            return self.string()
        if typ == 9:
            item_typ, n = self.unpack("I"), self.unpack("Q")
            if (fmt := _SCALAR_FMT.get(item_typ)) is not None:
                return list(struct.unpack(f"<{n}{fmt}", self.read(n * struct.calcsize(fmt))))
            return [self.value(item_typ) for _ in range(n)]
        if (fmt := _SCALAR_FMT.get(typ)) is None:
            raise ValueError(f"{self.path}: unknown GGUF value type {typ}")
        return self.unpack(fmt)


def _read_header(r: _Reader) -> tuple[int, dict[str, Any]]:
    magic = r.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{r.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = r.unpack("I")
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"{r.path}: unsupported GGUF version {version} (supported: {_SUPPORTED_VERSIONS}; "
                         "big-endian files are not supported)")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    kv = {}
    for _ in range(n_kv):
        key = r.string()
        kv[key] = r.value(r.unpack("I"))
    return n_tensors, kv


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return the GGUF key/value metadata (e.g. ``tokenizer.ggml.tokens``) of the file at ``path``."""
    with open(path, "rb") as f:
        return _read_header(_Reader(f, str(path)))[1]


def read_gguf_tensor_infos(path: str | os.PathLike) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Return ``(name, dims, ggml_type, offset)`` per tensor; dims are in GGUF order (fastest-varying first)."""
    with open(path, "rb") as f:
        r = _Reader(f, str(path))
        n_tensors, _ = _read_header(r)
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            dims = tuple(r.unpack("Q") for _ in range(r.unpack("I")))
            infos.append((name, dims, r.unpack("i"), r.unpack("Q")))
        return infos
