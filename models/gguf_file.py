"""A GGUF file's metadata and tensor table, read straight from its bytes.

The format (versions 2 and 3, little-endian; ggml's `docs/gguf.md`): a header,
`n_kv` key-value pairs, `n_tensors` tensor records (name, dims innermost first,
type, offset), then the tensors' data at `general.alignment`. `gguf.GGUFReader`
builds a numpy view for every value and string it meets, which for SmolLM2's
49152-token vocabulary and 48900 merges takes seconds in every process that
loads the model; `struct` reads the same bytes in a fraction of that
(`tests/test_gguf_file.py` checks both readers agree on every field and tensor).
The tensors stay as the file's bytes, memory-mapped; `gguf.quants.dequantize`
turns them into numbers.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  from gguf import GGMLQuantizationType

# GGUF value types: the scalars' struct formats; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  """One tensor: `shape` outermost first (numpy's order); `data` its bytes,
  uint8 `[*shape[:-1], bytes a row]`, as `gguf.quants.dequantize` takes them."""

  name: str
  tensor_type: GGMLQuantizationType
  shape: tuple[int, ...]
  data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  fields: dict[str, Any]
  tensors: list[GGUFTensor]


class _Bytes:
  """A cursor over the file's bytes."""

  def __init__(self, buf):
    self.buf, self.pos = buf, 0

  def scalar(self, fmt: str):
    value, = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += struct.calcsize(fmt)
    return value

  def string(self) -> str:
    n = self.scalar("<Q")
    if self.pos + n > len(self.buf):
      raise struct.error("a string runs past the end of the file")
    self.pos += n
    return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8")

  def value(self, kind: int):
    if kind in _SCALARS:
      return self.scalar(_SCALARS[kind])
    if kind == _STRING:
      return self.string()
    if kind != _ARRAY:
      raise ValueError(f"unknown GGUF value type {kind}")
    item, n = self.scalar("<I"), self.scalar("<Q")
    if item in _NUMPY:
      out = np.frombuffer(self.buf, _NUMPY[item], n, self.pos)
      self.pos += out.nbytes
      return out.tolist()
    return [self.value(item) for _ in range(n)]


def read_gguf(path: str | Path) -> GGUFFile:
  """The fields (scalars, strings, lists) and tensors of the GGUF file at `path`."""
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # 0.2 s: imported on use
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  cur = _Bytes(buf)
  try:
    if bytes(buf[:4]) != b"GGUF":
      raise ValueError(f"{path}: not a GGUF file (its first bytes are {bytes(buf[:4])!r})")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
      raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3, "
                       f"little-endian)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    fields = {}
    for _ in range(n_kv):
      key = cur.string()
      fields[key] = cur.value(cur.scalar("<I"))
    records = []
    for _ in range(n_tensors):
      name = cur.string()
      dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
      records.append((name, GGMLQuantizationType(cur.scalar("<I")), dims, cur.scalar("<Q")))
  except struct.error as e:
    raise ValueError(f"{path}: truncated or corrupt GGUF file ({e})") from None
  align = fields.get("general.alignment", 32)
  start = -(-cur.pos // align) * align
  tensors = []
  for name, kind, dims, offset in records:
    block, type_bytes = GGML_QUANT_SIZES[kind]
    shape = tuple(reversed(dims))
    row = shape[-1] // block * type_bytes
    n = int(np.prod(shape[:-1], dtype=np.int64)) * row
    if start + offset + n > len(buf):
      raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
    data = np.frombuffer(buf, np.uint8, n, start + offset).reshape(*shape[:-1], row)
    tensors.append(GGUFTensor(name, kind, shape, data))
  return GGUFFile(fields, tensors)
