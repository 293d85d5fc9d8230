"""Which GPU kernel `bigla(..., impl="auto")` runs, per GPU and shape, as measured.

Written by `benchmarks/bench_bigla.py --impls pallas mosaic --auto-table <this file>`: one row per
measured shape with the faster of the Triton ("pallas") and Mosaic GPU ("mosaic") kernels, forward +
backward. `impl="auto"` takes the row of the same GPU and head dims nearest in (log N, log B·H);
without one it runs the Triton kernel. Regenerate rather than edit.
"""

SOURCE = "bench_bigla.py, commit 12ac82e, NVIDIA H200"
# impl: the faster kernel; ms: each kernel's time; pass: "fwd_bwd" (or "fwd") as timed.
ROWS = (
    dict(device='NVIDIA H200', K=32, V=64, N=196, BH=384, impl='pallas',
         ms={'pallas': 0.261, 'mosaic': 0.7763}, **{'pass': 'fwd_bwd'}),
    dict(device='NVIDIA H200', K=32, V=64, N=196, BH=768, impl='pallas',
         ms={'pallas': 0.4584, 'mosaic': 1.3182}, **{'pass': 'fwd_bwd'}),
    dict(device='NVIDIA H200', K=32, V=64, N=196, BH=1536, impl='pallas',
         ms={'pallas': 0.896, 'mosaic': 2.5461}, **{'pass': 'fwd_bwd'}),
    dict(device='NVIDIA H200', K=32, V=64, N=1024, BH=96, impl='pallas',
         ms={'pallas': 0.4544, 'mosaic': 1.0584}, **{'pass': 'fwd_bwd'}),
    dict(device='NVIDIA H200', K=32, V=64, N=4096, BH=24, impl='pallas',
         ms={'pallas': 0.4495, 'mosaic': 1.057}, **{'pass': 'fwd_bwd'}),
    dict(device='NVIDIA H200', K=32, V=64, N=4096, BH=48, impl='pallas',
         ms={'pallas': 0.8154, 'mosaic': 1.9949}, **{'pass': 'fwd_bwd'}),
    dict(device='NVIDIA H200', K=32, V=64, N=16384, BH=6, impl='pallas',
         ms={'pallas': 0.4895, 'mosaic': 1.1063}, **{'pass': 'fwd_bwd'}),
)  # fmt: skip
