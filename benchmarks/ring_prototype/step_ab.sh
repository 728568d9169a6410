# On the device, from the repository root of this branch: the KIVI-2 decode step with the
# ring read by decode_attention_ring's kernel (this branch) against main's jnp ring, in
# one call. Before it, here: git archive main -o .devrun/base.tar (carry .devrun).
R=$PWD
mkdir -p /tmp/base && tar -xf $R/.devrun/base.tar -C /tmp/base
for which in base ring; do
  if [ $which = base ]; then cd /tmp/base; else cd $R; fi
  python -m pip install -q -e . --no-deps --no-build-isolation >/dev/null 2>&1
  cd /tmp
  for s in llama2-7b llama3-8b; do python -c "
from kivi_jax.bench_generate import generate_benchmark
generate_benchmark('$s', methods=('kivi2',), requests=(), batches=(), step_batches=(1, 32), largest=False, hf_batches=(), out='$OUT/ring_step_${which}_$s.json')" 2>&1 | grep step_ms | cut -c1-120; done
done
