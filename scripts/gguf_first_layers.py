"""A GGUF file of a model's first N layers (its tokenizer, embedding, final norm
and head kept, `block_count` set to N), the tensors' bytes copied as stored: a
real model that fits what a device call carries (64 MiB; SmolLM2's whole file is
98 MB, its first 10 layers about 53 MB).

  python scripts/gguf_first_layers.py IN.gguf OUT.gguf 10
"""

import sys

import gguf


def main(src: str, dst: str, layers: int) -> None:
  reader = gguf.GGUFReader(src)
  arch = reader.fields["general.architecture"].contents()
  writer = gguf.GGUFWriter(dst, arch)
  for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
      continue  # the writer writes these itself
    value = layers if name == f"{arch}.block_count" else field.contents()
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(name, value, vtype, sub_type=sub)
  for t in reader.tensors:
    if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
      continue
    writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
