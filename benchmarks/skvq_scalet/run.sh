# exp/skvq-scalet on a GPU: the hidden kernels' float64 checks with the scales
# transposed (KIVI_EXP_SCALET=1), then ab.py. OUT: a folder.
out=${1:-/tmp}
export PYTHONUNBUFFERED=1
KIVI_EXP_SCALET=1 timeout 240 python -m pytest -q -n 0 -x tests/test_decode_attention.py \
  -k "hidden_kernels_match and not tpu" 2>&1 | tail -3
timeout 300 python benchmarks/skvq_scalet/ab.py $out/skvq_scalet.json
