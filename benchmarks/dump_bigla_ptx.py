"""Dumps the PTX of the Pallas BiGLA kernels (forward + backward) for offline `ptxas -v` analysis.

    python benchmarks/dump_bigla_ptx.py DUMP_DIR     # on a GPU machine; then: ptxas -v -arch=sm_90

XLA links the Triton kernels of `pallas_call`s into the module's LLVM module, so `--xla_dump_to`
writes their PTX beside the HLO. Shapes: ViG-S 224 (short N) and ViG-T 1024 (long N).
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={sys.argv[1]} --xla_dump_hlo_as_text"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.bigla import bigla  # noqa: E402


def main():
    for B, N, H in ((128, 196, 6), (8, 4096, 3)):
        keys = jax.random.split(jax.random.key(0), 6)
        q, k = (jax.random.normal(kk, (B, N, H, 32), jnp.bfloat16) for kk in keys[:2])
        v = jax.random.normal(keys[2], (B, N, H, 64), jnp.bfloat16)
        gf, gb = (
            jax.nn.log_sigmoid(3 * jax.random.normal(kk, (B, N, H, 32))) / 16 for kk in keys[3:5]
        )
        do = jax.random.normal(keys[5], (B, N, H, 64), jnp.bfloat16)

        def loss(q, k, v, gf, gb, do):
            return jnp.vdot(bigla(q, k, v, gf, gb, impl="pallas").astype(jnp.float32), do)

        grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        grads = grad_fn(q, k, v, gf, gb, do.astype(jnp.float32))
        jax.block_until_ready(grads)
        print(f"dumped B={B} N={N} H={H}")


if __name__ == "__main__":
    main()
