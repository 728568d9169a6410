"""The TPU's flash kernel for the prompt (`pallas_kernels/prompt_attention_tpu.py`)
against the jnp path of `kivi_jax.attention.prompt_attention`, in TPU interpret mode,
and through Pallas's TPU lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tpu_interpret_params
from kivi_jax import attention
from kivi_jax.pallas_kernels import prompt_attention_tpu as pa_tpu

ON_CPU = jax.default_backend() == "cpu"


def _inputs(seed, b, t, hq, hkv, d, dtype):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), dtype) for h in (hq, hkv, hkv))
  # Ragged rows: empty, one token, part of a block, all of the prompt.
  n_valid = jnp.asarray([0, 1, t // 2 + 3, t][:b], jnp.int32)
  return q, k, v, n_valid


# (T, Hq, Hkv, D, window): one block of a short prompt, blocks of 128 with a last
# one partial, GQA and MHA, 64- and 128-wide heads, a sliding window across blocks.
CASES = [(20, 4, 2, 64, None), (300, 4, 1, 128, None), (300, 6, 3, 64, 100),
         (256, 2, 2, 128, 130)]


@pytest.mark.skipif(not ON_CPU, reason="TPU interpret mode is a CPU check")
@pytest.mark.parametrize("t, hq, hkv, d, window", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_the_jnp_path(t, hq, hkv, d, window, dtype):
  q, k, v, n_valid = _inputs(t + hq, 4, t, hq, hkv, d, dtype)
  got = jax.block_until_ready(pa_tpu.prompt_attention(
      q, k, v, n_valid, sliding_window=window, interpret=tpu_interpret_params()))
  want = attention.prompt_attention(q, k, v, n_valid, sliding_window=window)
  assert got.shape == want.shape and got.dtype == want.dtype
  for i, n in enumerate(np.asarray(n_valid)):  # the real rows only
    if dtype == jnp.float32:  # the same sums in another order (1.3e-6 seen)
      rtol = atol = 5e-6
    else:
      # Both round the probabilities to bf16 (2^-9 each) for the second product,
      # here unnormalized against the running maximum: 2^-8 of the row's largest
      # value between them; then each rounds its output to bf16 (2^-9 each).
      rtol, atol = 2**-8, 2**-8 * float(jnp.abs(v[i, :n].astype(jnp.float32)).max(initial=0))
    np.testing.assert_allclose(np.asarray(got[i, :n], np.float32),
                               np.asarray(want[i, :n], np.float32), rtol=rtol, atol=atol)


def test_kernel_names_heads_that_do_not_group():
  q, k, v, n_valid = _inputs(0, 2, 16, 3, 2, 64, jnp.float32)
  with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of kv heads \(2\)"):
    pa_tpu.prompt_attention(q, k, v, n_valid, interpret=True)


@pytest.mark.parametrize("t, hq, hkv, d, window", CASES)
def test_kernel_lowers_for_a_tpu(t, hq, hkv, d, window, tpu_lowering):
  q, k, v, n_valid = _inputs(0, 2, t, hq, hkv, d, jnp.bfloat16)
  f = jax.jit(lambda *a: pa_tpu.prompt_attention(*a, sliding_window=window))
  assert "tpu_custom_call" in f.trace(q, k, v, n_valid).lower(
      lowering_platforms=("tpu",)).as_text()
