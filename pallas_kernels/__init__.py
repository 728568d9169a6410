"""Pallas kernels (GPU and TPU), each beside the jnp reference it must match."""
