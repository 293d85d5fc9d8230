"""Which GPU kernel `bigla(..., impl="auto")` runs, per GPU and shape, as measured.

Written by `benchmarks/bench_bigla.py --impls pallas mosaic --auto-table <this file>`: one row per
measured shape with the faster of the Triton ("pallas") and Mosaic GPU ("mosaic") kernels, forward +
backward. `impl="auto"` takes the row of the same GPU and head dims nearest in (log N, log B·H);
without one it runs the Triton kernel. The first two rows were entered from `check_mosaic.py`'s
forward timings (commit 28a09d5, before the Mosaic path had a forward + backward measured here);
regenerate rather than edit.
"""

SOURCE = "benchmarks/check_mosaic.py, commit 28a09d5, NVIDIA H200 (forward only)"
# impl: the faster kernel; ms: each kernel's time; pass: "fwd_bwd" (or "fwd") as timed.
ROWS = (
    dict(device="NVIDIA H200", K=32, V=64, N=196, BH=768, impl="pallas",
         ms={"pallas": 0.187, "mosaic": 0.349}, **{"pass": "fwd"}),
    dict(device="NVIDIA H200", K=32, V=64, N=4096, BH=24, impl="pallas",
         ms={"pallas": 0.178, "mosaic": 0.270}, **{"pass": "fwd"}),
)  # fmt: skip
