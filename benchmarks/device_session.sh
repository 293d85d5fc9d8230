#!/usr/bin/env bash
# One GPU call (device tool): the ViG-vs-DeiT headline comparisons, then the Fashion-MNIST run,
# each bounded in time so the call fits the session's device budget; everything lands in $OUT.
#   carry: .whl (ml_collections, tfds, grain, array_record wheels), .carry/fashion-mnist (IDX .gz)
# Afterwards, here: python benchmarks/run_fashion_mnist.py --workdir /tmp/unused \
#   --from-metrics OUT/fm_metrics.jsonl --wall-s S --device D
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
log=$OUT/session.log

# 1) ViG-S vs DeiT-B at 224 (B128) and ViG-T vs DeiT-T at 1024 (B 128*(224/1024)^2 -> 6).
timeout -k 5 "${RES_224_S:-70}" python benchmarks/bench_resolution.py --sizes 224 \
  --pairs vig_s:deit_b --iters 10 --budget-s 40 --out "$OUT/res224" 2>&1 | tail -n 15 | tee -a "$log"
timeout -k 5 "${RES_1024_S:-70}" python benchmarks/bench_resolution.py --sizes 1024 \
  --pairs vig_t:deit_t --iters 10 --budget-s 40 --out "$OUT/res1024" 2>&1 | tail -n 15 | tee -a "$log"

# 2) Fashion-MNIST: train.py, metrics copied to $OUT as they arrive; SIGTERM at the time limit
# (the loop saves a checkpoint and stops), the curve is drawn afterwards from the metrics.
export VIG_FASHION_MNIST_DIR=$PWD/.carry/fashion-mnist
start=$(date +%s)
timeout -k 15 -s TERM "${FM_S:-260}" python train.py --config configs/fashion_mnist.py \
  --workdir /tmp/vig_fmnist --config.loop.ckpt_every_steps=100000 "$@" > /tmp/fm.log 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  cp /tmp/vig_fmnist/metrics.jsonl "$OUT/fm_metrics.jsonl" 2>/dev/null
  sleep 5
done
wait $pid; echo "train.py exit $? after $(( $(date +%s) - start )) s" | tee -a "$log"
cp /tmp/vig_fmnist/metrics.jsonl "$OUT/fm_metrics.jsonl" 2>/dev/null
tr '\r' '\n' < /tmp/fm.log | grep -v '^\s*$' | tail -n 60 > "$OUT/fm_train.log"
grep -h "eval/top1" "$OUT/fm_metrics.jsonl" | tail -n 5
