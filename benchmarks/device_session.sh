#!/usr/bin/env bash
# One bounded GPU call (device tool) running the named stages in order; everything lands in $OUT.
#   carry: .whl (ml_collections, tfds, grain, array_record wheels), .carry/fashion-mnist (IDX .gz)
#   bash benchmarks/device_session.sh gpu_tests@bg fmnist bigla models ...
# A stage named NAME@bg starts in the background at low CPU priority (for checks whose timing does
# not matter, e.g. the GPU tests beside the Fashion-MNIST run); the call waits for it at the end.
# Each stage is bounded by its own timeout (env NAME_S overrides the default below).
# Afterwards, here: python benchmarks/run_fashion_mnist.py --workdir /tmp/unused \
#   --from-metrics OUT/fashion_mnist_metrics.jsonl --wall-s S --device D   (if the run was cut)
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader | tee "$OUT/session.log"
log=$OUT/session.log
stamp() { echo "[$(date +%T)] $*" | tee -a "$log"; }

stage_gpu_tests() {  # compiled-kernel tests; xdist workers share the GPU, no preallocation
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 "${GPU_TESTS_S:-420}" \
    python -m pytest -m gpu -q -n 4 -p no:cacheprovider tests/test_bigla_pallas.py \
    > "$OUT/gpu_tests.log" 2>&1
  tail -n 25 "$OUT/gpu_tests.log" | tee -a "$log"
}

stage_fmnist() {  # the full Fashion-MNIST run through train.py; curve + JSON into $OUT
  timeout -k 15 -s TERM "${FMNIST_S:-540}" python benchmarks/run_fashion_mnist.py \
    --workdir /tmp/vig_fmnist --out-dir "$OUT" --source-dir .carry/fashion-mnist \
    --config.loop.ckpt_every_steps=100000 ${FMNIST_ARGS:-} > /tmp/fm.log 2>&1
  echo "exit $?" | tee -a "$log"
  tr '\r' '\n' < /tmp/fm.log | grep -v '^\s*$' | grep -v "it/s\]$" | tail -n 80 > "$OUT/fashion_mnist_train.log"
  grep -h "eval/top1" /tmp/fm.log | tail -n 3 | tee -a "$log"
  [ -f "$OUT/fashion_mnist_metrics.jsonl" ] || cp /tmp/vig_fmnist/metrics.jsonl "$OUT/fashion_mnist_metrics.jsonl"
}

stage_bigla() {  # kernel table (issue 4)
  timeout -k 10 "${BIGLA_S:-420}" python benchmarks/bench_bigla.py --out "$OUT" \
    ${BIGLA_ARGS:-} 2>&1 | tail -n 40 | tee -a "$log"
}

stage_models() {  # six models x impls at 224, B128 (issue 5)
  timeout -k 10 "${MODELS_S:-420}" python benchmarks/bench_models.py --out "$OUT/models" \
    ${MODELS_ARGS:-} 2>&1 | tail -n 30 | tee -a "$log"
}

stage_train_step() {  # ViG-S train step B128 224 + the demo config's model (issue 6)
  timeout -k 10 "${TRAIN_STEP_S:-240}" python benchmarks/bench_train_step.py \
    --out "$OUT/train_step.json" ${TRAIN_STEP_ARGS:-} 2>&1 | tail -n 15 | tee -a "$log"
}

stage_demo() {  # python train.py --config configs/demo.py on the GPU
  timeout -k 10 -s TERM "${DEMO_S:-240}" python train.py --config configs/demo.py \
    --workdir /tmp/vig_demo > /tmp/demo.log 2>&1
  echo "demo exit $?" | tee -a "$log"
  tr '\r' '\n' < /tmp/demo.log | grep -v '^\s*$' | tail -n 30 > "$OUT/demo_train.log"
  cp /tmp/vig_demo/metrics.jsonl "$OUT/demo_metrics.jsonl" 2>/dev/null
}

stage_resolution() {  # ViG vs DeiT across sizes (issue 7)
  timeout -k 10 "${RESOLUTION_S:-560}" python benchmarks/bench_resolution.py --out "$OUT/resolution" \
    --budget-s "${RESOLUTION_BUDGET_S:-450}" ${RESOLUTION_ARGS:-} 2>&1 | tail -n 30 | tee -a "$log"
}

stage_scaling() {  # 1..N GPUs (issue 8)
  timeout -k 10 "${SCALING_S:-540}" python benchmarks/bench_scaling.py --out "$OUT/scaling.json" \
    ${SCALING_ARGS:-} 2>&1 | tail -n 30 | tee -a "$log"
}

bg=()
for s in "$@"; do
  name=${s%@bg}
  if [ "$s" != "$name" ]; then
    stamp "start $name (background)"
    ( renice -n 19 -p $BASHPID > /dev/null; "stage_$name"; stamp "end $name" ) > /dev/null 2>&1 &
    bg+=($!)
  else
    stamp "start $name"; "stage_$name"; stamp "end $name"
  fi
done
for p in "${bg[@]}"; do wait "$p"; done
stamp "done"
