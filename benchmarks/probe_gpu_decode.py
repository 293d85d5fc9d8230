"""Probe: nvJPEG decoding (torchvision, one thread) beside a ViG-S training step on the same GPU.

    python benchmarks/probe_gpu_decode.py OUT [STREAM_PRIORITY]    # on a GPU host with torchvision

Times the jitted ViG-S 224² B128 training step alone, then while a background thread decodes
batches of 128 ImageNet-like JPEGs on the GPU as fast as it can (and counts them), then alone
again. Writes OUT/decode_cost.json. STREAM_PRIORITY: the decoder's CUDA stream priority (0, or
-1 for high). Result on an H200: docs/data.md, benchmarks/results/nvjpeg_decode_cost.json.
"""

import json
import multiprocessing as mp
import os
import pathlib
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
OUT = sys.argv[1]


def gen(i):
    from vig_jax.data import imagenet_like

    return imagenet_like.jpeg_bytes(0, "train", i)


def main():
    with mp.Pool(16) as p:
        blobs = p.map(gen, range(512))
    import torch
    from torchvision.io import decode_jpeg

    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    batches = [datas[i : i + 128] for i in range(0, 512, 128)]
    decode_jpeg(batches[0], device="cuda")
    torch.cuda.synchronize()

    import jax
    import jax.numpy as jnp
    import optax

    from vig_jax.models import create_model

    model = create_model("vig_s", dtype=jnp.bfloat16, drop_path_rate=0.0)
    x = jnp.zeros((128, 224, 224, 3), jnp.bfloat16)
    y = jnp.zeros((128,), jnp.int32)
    params = model.init(jax.random.key(0), x[:2], train=False)["params"]
    tx = optax.adamw(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss(p):
            logits = model.apply({"params": p}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), y
            ).mean()

        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    for _ in range(3):
        params, opt = step(params, opt, x, y)
    jax.block_until_ready(params)

    def timed(n=30):
        nonlocal params, opt
        t0 = time.perf_counter()
        for _ in range(n):
            params, opt = step(params, opt, x, y)
        jax.block_until_ready(params)
        return (time.perf_counter() - t0) / n * 1e3

    res = {"step_ms_alone": timed()}
    stop, decoded = threading.Event(), [0]
    stream = torch.cuda.Stream(priority=int(sys.argv[2]) if len(sys.argv) > 2 else 0)

    def decoder():
        with torch.cuda.stream(stream):
            while not stop.is_set():
                for bt in batches:
                    decode_jpeg(bt, device="cuda")
                    decoded[0] += len(bt)
                stream.synchronize()

    th = threading.Thread(target=decoder)
    th.start()
    time.sleep(2)
    d0, t0 = decoded[0], time.perf_counter()
    res["step_ms_with_decode"] = timed()
    res["decode_img_s_during"] = (decoded[0] - d0) / (time.perf_counter() - t0)
    stop.set()
    th.join()
    res["step_ms_alone_after"] = timed()
    res["train_img_s_alone"] = 128e3 / res["step_ms_alone"]
    res["train_img_s_with_decode"] = 128e3 / res["step_ms_with_decode"]
    print(json.dumps(res, indent=1))
    os.makedirs(OUT, exist_ok=True)
    json.dump(res, open(os.path.join(OUT, "decode_cost.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
