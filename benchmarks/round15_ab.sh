# exp/round15 on the H200 (prepared 2026-12-04, not yet run): four changes, each
# behind an env knob whose default here is the new form, against main's form (=0 / 4):
#   KIVI_EXP_KSPLIT=1  each tile's product in two halves of K, the second half's codes
#                      dequantized while the first half's wgmma runs
#   KIVI_EXP_SHIFTS=1  codes unpacked where they lie in the mantissa (unpack_plan):
#                      2-bit codes two shifts a word (bf16) or one (fp16), not seven
#   KIVI_EXP_VWARPS=2  the pair layout's value writer with 2 warps a program, not 4
#   KIVI_EXP_TAIL=1    a row's last update whose live tokens all lie in its first 128
#                      runs that half alone (the step rows' 1152 quantized tokens end
#                      half-way through a step: this A/B's step shows the most it can
#                      save; in `generate` a row's tokens end so at about half of its
#                      decode steps)
# Each setting runs in its own process (the knobs are read when a kernel is traced).
# `bash benchmarks/round15_ab.sh kernels` (at most 580 s): the float64 checks with every
# change on, then P1's 32k shape (GQA: the unfolded kernel), KIVI-2 and KIVI-4, five
# kernel settings; `... serving` (at most 460 s): the pair writer's compiled checks,
# then the same at B=256 L=1536 (MHA: the folded kernel).
# `bash benchmarks/round15_ab.sh step`, then `... step2` (at most 420 and 560 s; the
# cond of exp/tail doubles the kernel's lowering time): the 512-row Llama-2-7B KIVI-2
# step for main's settings in each call, beside each change alone and all four, with
# the kernels' per-launch device times from each trace (compare rows of one call).
# In a session's 1800 s: kernels, step, step2 first (typically 350, 230 and 300 s),
# serving if time is left. Then: results into benchmarks/results/, what measured
# faster landed without its knob (the float64 checks run again for that form), the
# rest dropped (NOTES.md).
case "$1" in kernels|serving|step|step2) ;; *) echo "usage: bash $0 kernels|serving|step|step2"; exit 2 ;; esac
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -1
main="KIVI_EXP_KSPLIT=0 KIVI_EXP_SHIFTS=0 KIVI_EXP_TAIL=0 KIVI_EXP_VWARPS=4"
if [ "$1" = kernels ]; then
  timeout 170 python -m pytest -q -p no:cacheprovider -n 0 tests/test_decode_pairs.py \
    -k "unpack_plan or (float64 and (2-2-32-1-128 or 4-4-32-1-128 or 2-4-32-1-128 or 2-2-32-4-128 or 4-4-32-4-128 or 8-8-32-4-128 or 2-2-128-4-128 or 2-2-32-4-64)) or (through_the_kernel and 1-None)" \
    2>&1 | grep -E "passed|failed|^FAILED|Error: \(" | head -12
  shapes="--batch 8 --q-heads 32 --kv-heads 8 --lengths 32768"
fi
if [ "$1" = serving ]; then
  timeout 60 python -m pytest -q -p no:cacheprovider -n 0 tests/test_quantize_pack.py -k "pair" \
    2>&1 | tail -1
  shapes="--batch 256 --q-heads 32 --kv-heads 32 --lengths 1536"
fi
if [ "$1" = kernels ] || [ "$1" = serving ]; then
  for s in "$main" "KIVI_EXP_KSPLIT=1 KIVI_EXP_SHIFTS=0 KIVI_EXP_TAIL=0" \
           "KIVI_EXP_KSPLIT=0 KIVI_EXP_SHIFTS=1 KIVI_EXP_TAIL=0" \
           "KIVI_EXP_KSPLIT=0 KIVI_EXP_SHIFTS=0 KIVI_EXP_TAIL=1" \
           "KIVI_EXP_KSPLIT=1 KIVI_EXP_SHIFTS=1 KIVI_EXP_TAIL=1"; do
    tag=$(echo "$s" | tr -dc '0-9' | cut -c1-3)
    echo "== $s"
    env $s timeout 80 kivi-jax bench attention $shapes --methods kivi2,kivi4 --layouts pairs \
      --repeats 20 --out $OUT/$1_$tag.json 2>&1 | grep -iE "kivi|cudnn" | tail -4
  done
fi
if [ "$1" = step ]; then
  settings=("$main" "KIVI_EXP_KSPLIT=1 KIVI_EXP_SHIFTS=0 KIVI_EXP_TAIL=0 KIVI_EXP_VWARPS=4"
            "KIVI_EXP_KSPLIT=0 KIVI_EXP_SHIFTS=1 KIVI_EXP_TAIL=0 KIVI_EXP_VWARPS=4")
fi
if [ "$1" = step2 ]; then
  settings=("$main" "KIVI_EXP_KSPLIT=0 KIVI_EXP_SHIFTS=0 KIVI_EXP_TAIL=1 KIVI_EXP_VWARPS=4"
            "KIVI_EXP_KSPLIT=0 KIVI_EXP_SHIFTS=0 KIVI_EXP_TAIL=0 KIVI_EXP_VWARPS=2"
            "KIVI_EXP_KSPLIT=1 KIVI_EXP_SHIFTS=1 KIVI_EXP_TAIL=1 KIVI_EXP_VWARPS=2")
fi
if [ "$1" = step ] || [ "$1" = step2 ]; then
  for s in "${settings[@]}"; do
    tag=$(echo "$s" | tr -dc '0-9')
    echo "== $s"
    env $s KIVI_JAX_COMMIT=round15-$tag timeout 140 kivi-jax bench generate \
      --shape llama2-7b --methods kivi2 --requests '' --step-batches 512 --hf-batches '' \
      --row-timeout 130 --out $OUT/step_$tag.json 2>&1 | grep step_ms
    python scripts/trace_launches.py $OUT/step_$tag.json 'kivi_pair_decode|kivi_quantize|kivi_ring'
  done
fi
