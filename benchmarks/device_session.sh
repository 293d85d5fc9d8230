#!/usr/bin/env bash
# One bounded GPU call (device tool): named stages in lanes, one lane per GPU, results in $OUT.
#   carry: .whl (ml_collections, tfds, grain, array_record wheels), .carry/fashion-mnist (IDX .gz)
#
#   bash benchmarks/device_session.sh 0:bigla,train_step 1:gpu_tests,models -- all:scaling
#
#   MODELS_CHUNKED_ARGS="--impls chunked" bash benchmarks/device_session.sh 0:models 1:models.chunked
#
# Lanes given together run at once, each on the GPUs it names (CUDA_VISIBLE_DEVICES; "all" = every
# GPU); stages in a lane run in order; "--" starts the next group once every lane of the previous one
# has ended. Each stage is bounded by its own timeout (env STAGE_S, e.g. BIGLA_S=300, overrides the
# default) and takes extra arguments from env STAGE_ARGS. Everything a stage writes goes to
# /tmp/res/<stage>; /tmp/res is packed into $OUT/results.tgz every 20 s and at the end (the device
# returns at most 8 files), so a call cut at its limit still returns what finished.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
RES=/tmp/res
mkdir -p "$RES"
log=$RES/session.log
nvidia-smi --query-gpu=index,name,memory.used,clocks.sm --format=csv,noheader | tee -a "$log"
stamp() { echo "[$(date +%T)] $*" | tee -a "$log"; }
pack() { tar -czf "$OUT/.results.tgz" -C "$RES" . 2> /dev/null && mv "$OUT/.results.tgz" "$OUT/results.tgz"; }

stage_gpu_tests() {  # compiled-kernel tests; xdist workers share the GPU, no preallocation
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 "${GPU_TESTS_S:-420}" \
    python -m pytest -m gpu -v -n 4 -p no:cacheprovider ${GPU_TESTS_ARGS:-tests/test_bigla_pallas.py} \
    > "$1/pytest.log" 2>&1
  grep -E "PASSED|FAILED|ERROR|passed|failed" "$1/pytest.log" | tail -n 40
}

stage_fmnist() {  # the full Fashion-MNIST run through train.py; curve + JSON
  timeout -k 15 -s TERM "${FMNIST_S:-540}" python benchmarks/run_fashion_mnist.py \
    --workdir /tmp/vig_fmnist --out-dir "$1" --source-dir .carry/fashion-mnist \
    --config.loop.ckpt_every_steps=100000 ${FMNIST_ARGS:-} > /tmp/fm.log 2>&1
  echo "exit $?"
  tr '\r' '\n' < /tmp/fm.log | grep -v '^\s*$' > "$1/train.log"
  grep -h "eval/top1" "$1/train.log" | tail -n 3
}

stage_bigla() {  # kernel table (issue 4)
  timeout -k 10 "${BIGLA_S:-420}" python benchmarks/bench_bigla.py --out "$1" ${BIGLA_ARGS:-}
}

stage_models() {  # six models x impls at 224, B128 (issue 5)
  timeout -k 10 "${MODELS_S:-420}" python benchmarks/bench_models.py --out "$1/models" \
    ${MODELS_ARGS:-}
}

stage_train_step() {  # ViG-S train step, B128, 224, through the real trainer (issue 6)
  timeout -k 10 "${TRAIN_STEP_S:-240}" python benchmarks/bench_train_step.py \
    --out "$1" ${TRAIN_STEP_ARGS:-}
}

stage_demo() {  # python train.py --config configs/demo.py on the GPU (issue 6)
  local start=$SECONDS
  timeout -k 10 -s TERM "${DEMO_S:-240}" python train.py --config configs/demo.py \
    --workdir /tmp/vig_demo ${DEMO_ARGS:-} > /tmp/demo.log 2>&1
  echo "demo exit $? after $((SECONDS - start)) s" | tee "$1/wall.txt"
  tr '\r' '\n' < /tmp/demo.log | grep -v '^\s*$' > "$1/train.log"
  cp /tmp/vig_demo/metrics.jsonl "$1/metrics.jsonl" 2> /dev/null
  tail -n 5 "$1/train.log"
}

stage_resolution() {  # ViG vs DeiT across sizes (issue 7)
  timeout -k 10 "${RESOLUTION_S:-560}" python benchmarks/bench_resolution.py \
    --out "$1/resolution" --budget-s "${RESOLUTION_BUDGET_S:-450}" ${RESOLUTION_ARGS:-}
}

# One device count per tagged stage, e.g. scaling.one in a lane beside other work, then
# scaling.two on all GPUs (SCALING_ONE_ARGS="--devices 1", SCALING_TWO_ARGS="--devices 2"); merge:
# bench_scaling.py --merge scaling.one/scaling.json scaling.two/scaling.json --out ...
stage_scaling() {  # 1..N GPUs in one run (issue 8)
  timeout -k 10 "${SCALING_S:-540}" python benchmarks/bench_scaling.py --out "$1/scaling.json" \
    ${SCALING_ARGS:-}
}

# A stage may carry a tag, STAGE.TAG (e.g. models.chunked): the same stage again in its own
# directory, with STAGE_TAG_ARGS / STAGE_TAG_S (e.g. MODELS_CHUNKED_ARGS) as its STAGE_ARGS / STAGE_S.
with_tag() {
  [[ $1 == *.* ]] || return 0
  local base=${1%%.*} tag=${1#*.} v
  base=${base^^} tag=${tag^^}
  for v in ARGS S; do
    local from=${base}_${tag}_$v
    [ -n "${!from+x}" ] && export "${base}_$v=${!from}"
  done
  return 0
}

run_lane() {  # GPUS:stage,stage,...
  local gpus=${1%%:*} stages=${1#*:} s dir
  [ "$gpus" = all ] || export CUDA_VISIBLE_DEVICES=$gpus
  for s in ${stages//,/ }; do
    dir=$RES/$s
    mkdir -p "$dir"
    stamp "gpu $gpus: start $s"
    ( with_tag "$s" && "stage_${s%%.*}" "$dir" ) > "$dir/stdout.log" 2>&1
    stamp "gpu $gpus: end $s (exit $?)"
    tail -n 25 "$dir/stdout.log"
  done
}

( while sleep 20; do pack; done ) &
packer=$!
lanes=()
for arg in "$@" --; do
  if [ "$arg" = -- ]; then
    for p in "${lanes[@]}"; do wait "$p"; done
    lanes=()
  else
    run_lane "$arg" &
    lanes+=($!)
  fi
done
kill $packer 2> /dev/null
stamp "done"
pack
