"""The GGUF reader against the `gguf` package's own writer and reader."""

import gguf
import numpy as np
import pytest

from kivi_jax.models.gguf_file import read_gguf


@pytest.fixture
def written(tmp_path):
  """A file from `gguf.GGUFWriter`: a value of every type, and tensors in f32,
  f16 and Q8_0 (the last quantized by `gguf` itself)."""
  path = tmp_path / "t.gguf"
  rng = np.random.default_rng(0)
  w = gguf.GGUFWriter(path, "llama")
  w.add_uint8("u8", 200)
  w.add_int8("i8", -100)
  w.add_uint16("u16", 60000)
  w.add_int16("i16", -30000)
  w.add_uint32("u32", 4_000_000_000)
  w.add_int32("i32", -2_000_000_000)
  w.add_float32("f32", 0.5)
  w.add_uint64("u64", 2**63 + 5)
  w.add_int64("i64", -(2**62))
  w.add_float64("f64", 1e-300)
  w.add_bool("bool", True)
  w.add_string("str", "naïve \u2063 text")
  w.add_array("ints", [3, 1, 4, 1, 5])
  w.add_array("strs", ["a", "", "Ġthe", "<|im_end|>"])
  x = rng.standard_normal((8, 64)).astype(np.float32)
  w.add_tensor("t.f32", x)
  w.add_tensor("t.f16", x.astype(np.float16))
  q8 = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
  w.add_tensor("t.q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path, x


def test_reads_what_the_writer_wrote(written):
  path, x = written
  f = read_gguf(path)
  assert {k: f.fields[k] for k in ("u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64",
                                   "bool", "str", "ints", "strs")} == {
      "u8": 200, "i8": -100, "u16": 60000, "i16": -30000, "u32": 4_000_000_000,
      "i32": -2_000_000_000, "u64": 2**63 + 5, "i64": -(2**62), "bool": True,
      "str": "naïve \u2063 text", "ints": [3, 1, 4, 1, 5],
      "strs": ["a", "", "Ġthe", "<|im_end|>"]}
  assert f.fields["f32"] == 0.5 and f.fields["f64"] == 1e-300
  assert f.fields["general.architecture"] == "llama"
  t = {t.name: t for t in f.tensors}
  assert [t[n].shape for n in ("t.f32", "t.f16", "t.q8")] == [(8, 64)] * 3
  np.testing.assert_array_equal(gguf.quants.dequantize(t["t.f32"].data, t["t.f32"].tensor_type),
                                x)
  np.testing.assert_array_equal(gguf.quants.dequantize(t["t.f16"].data, t["t.f16"].tensor_type),
                                x.astype(np.float16).astype(np.float32))
  # Q8_0: 8 bits a value, a scale of absmax / 127 per 32 values: within half a step.
  q8 = gguf.quants.dequantize(t["t.q8"].data, t["t.q8"].tensor_type)
  assert np.abs(q8 - x).max() <= np.abs(x).max() / 127


def test_bad_files_are_refused_naming_them(written, tmp_path):
  path, _ = written
  data = path.read_bytes()
  cases = {"magic": b"GGML" + data[4:], "version": data[:4] + b"\x01\0\0\0" + data[8:],
           "cut_in_fields": data[:200], "cut_in_tensors": data[:-100]}
  messages = {"magic": "not a GGUF file", "version": "GGUF version 1 is not supported",
              "cut_in_fields": "truncated or corrupt", "cut_in_tensors": "runs past the end"}
  for name, content in cases.items():
    bad = tmp_path / f"{name}.gguf"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"{bad}: .*{messages[name]}"):
      read_gguf(bad)


@pytest.mark.slow
def test_agrees_with_gguf_on_smollm2(smollm2_path):
  ours, theirs = read_gguf(smollm2_path), gguf.GGUFReader(smollm2_path)
  # GGUFReader adds the header's counts as fields named GGUF.*.
  keys = {k for k in theirs.fields if not k.startswith("GGUF.")}
  assert set(ours.fields) == keys
  for k in keys:
    value = theirs.fields[k].contents()
    assert ours.fields[k] == value and type(ours.fields[k]) is type(value), k
  assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
  for a, b in zip(ours.tensors, theirs.tensors):
    assert a.tensor_type == b.tensor_type and a.shape == tuple(reversed(b.shape.tolist()))
    np.testing.assert_array_equal(a.data.reshape(-1), b.data.reshape(-1).view(np.uint8))
