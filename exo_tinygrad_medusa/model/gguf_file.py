"""Where each tensor's bytes sit in a GGUF file, read with numpy: packed weights are built from these bytes directly.

Going through tinygrad for them realized every tensor's bytes on their own (a schedule per tensor, each walking
every live tensor): about half of a model's load time. The format (GGUF v2/v3): a header, the metadata key-values,
the tensor infos (name, shape, GGML type, offset), then the data, aligned to `general.alignment` (default 32)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.take("Q")
        text = bytes(self.data[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.take("I"), self.take("Q")
            if item_kind in _SCALARS:  # skip numeric arrays (the tokenizer's scores) in one step
                size = struct.calcsize("<" + _SCALARS[item_kind]) * count
                self.pos += size
                return None
            return [self.value(item_kind) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(data: memoryview, name: str = "the file") -> tuple[_Reader, int, int]:
    """Reads past the header and the metadata of GGUF bytes: (a reader at the first tensor info, the tensor count,
    the data alignment)."""
    if bytes(data[:4]) != b"GGUF":
        raise ValueError(f"{name} is not a GGUF file")
    reader = _Reader(data)
    reader.pos = 4
    version, n_tensors, n_kv = reader.take("I"), reader.take("Q"), reader.take("Q")
    if version not in (2, 3):
        raise ValueError(f"{name}: GGUF version {version} is not supported (2 and 3 are)")
    alignment = 32
    for _ in range(n_kv):
        key, kind = reader.string(), reader.take("I")
        value = reader.value(kind)
        if key == "general.alignment":
            alignment = int(value)
    return reader, n_tensors, alignment


def tensor_bytes(path: str | Path) -> dict[str, tuple[int, np.ndarray]]:
    """{tensor name: (GGML type, its bytes as a read-only uint8 view of the memory-mapped file)}. Each view runs to
    the next tensor's data (or the file's end): callers cut it to the size their type and shape need."""
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    reader, n_tensors, alignment = read_metadata(memoryview(mapped), str(path))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = reader.string(), reader.take("I")
        reader.pos += 8 * n_dims  # the shape: tinygrad's loader reports it
        ggml_type, offset = reader.take("I"), reader.take("Q")
        infos.append((offset, name, ggml_type))
    start = -(-reader.pos // alignment) * alignment
    infos.sort()
    ends = [offset for offset, _, _ in infos[1:]] + [len(mapped) - start]
    return {name: (ggml_type, mapped[start + offset:start + end]) for (offset, name, ggml_type), end in zip(infos, ends)}


def load_gguf(path: str | Path) -> tuple[dict, dict, dict[str, tuple[int, np.ndarray]]]:
    """tinygrad's GGUF reader (metadata and lazily dequantized tensors) plus each tensor's GGML type and bytes. A
    tensor whose bytes are not in this file (later parts of a split GGUF) is simply not offered for packing."""
    from tinygrad.llm.gguf import gguf_load
    kv, state = gguf_load(str(path))
    blocks = tensor_bytes(path)
    return kv, state, {name: blocks[name] for name in state if name in blocks}
