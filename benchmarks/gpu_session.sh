#!/usr/bin/env bash
# Everything the Triton backend needs from a GPU, as one prepared run (issue #5): the Triton
# tests compiled for the GPU, then `attnkit bench --device cuda`. Made for a machine lent for
# minutes (the device tool: `run(command="bash benchmarks/gpu_session.sh", timeout_s=600)`):
# each stage has its own time limit, the benchmark saves its table after every row, and all
# output lands in $OUT (default out/gpu_session):
#   env.txt    GPU, driver, torch and triton versions
#   tests.log  pytest of tests/test_triton*.py on CUDA (TRITON_INTERPRET=0)
#   gpu_decode.md  the decoding table (one query over a KV cache), gpu_decode.json, decode.log
#   walks.txt  host and device time to make a packed step's tile walks (benchmarks/triton_walks.py)
#   gpu.md     the attention table (TFLOP/s), gpu.json every figure; bench.log its output
#   ring.txt   (stage "ring", not run by default) ring attention on one GPU over NCCL, plain
#              and with packed documents, bf16 forward+backward, its blocks on Triton's
#              kernels then on tiled's, with a softcap, with ALiBi (each block at its offset),
#              ulysses_attention and hybrid_attention, cross-attention over twice as many
#              keys (--kv-seq), then one token decoded over a
#              sharded cache (examples/sharded_decoding.py), generation over a sharded
#              prompt and source (examples/sharded_generation.py [--translate]): NCCL's
#              collectives and the examples' CUDA tensors
#
#   STAGES="tests decode walks bench" (default), any of them, "autotune" (bench, tuned tiles)
#   or "ring"
#   TESTS_S=150 DECODE_S=110 WALKS_S=40 BENCH_S=280  seconds each stage may take (rows so
#   far are kept)
#   QUICK=1                  bench N <= 8k and D = 64 only
#   BENCH_ARGS="--dims 64 --lengths 16384 32768"   the part of the table still missing
#   RING_S=60 RING_SEQ=65536  the ring stage's limit per run and its length
#   DECODE_CONTEXT=1048576   the sharded-cache decoding's context (ring stage)
#   WORKERS=8                pytest-xdist workers for the tests (they compile in parallel)
#   SMOKE=1                  dry run on a CPU: tests and a tiny bench under TRITON_INTERPRET=1
# Needs only python3 with torch and triton (the device image has both): attnkit runs from src/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_session}
PY=${PYTHON:-python3}
STAGES=${STAGES:-tests decode walks bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  bench_args=(--smoke)
else
  export TRITON_INTERPRET=0  # tests/test_triton*.py default to the interpreter otherwise
  bench_args=()
  [ "${QUICK:-0}" = 1 ] && bench_args=(--quick)
fi
read -r -a extra <<<"${BENCH_ARGS:-}"
bench_args+=("${extra[@]}")

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
"cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/env.txt"

status=0
for stage in $STAGES; do
  echo "== $stage"
  case $stage in
    tests)
      timeout "${TESTS_S:-150}" $PY -m pytest -q -p no:cacheprovider -o addopts="" \
        -n "${WORKERS:-8}" tests/test_triton.py tests/test_triton_autotune.py \
        tests/test_triton_random.py 2>&1 |
        tee "$OUT/tests.log"
      ;;
    decode)
      timeout "${DECODE_S:-110}" $PY benchmarks/gpu.py --only decode "${bench_args[@]}" \
        --out "$OUT/gpu_decode.md" --json "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/decode.log"
      ;;
    walks)
      walks_args=()
      [ "${SMOKE:-0}" = 1 ] && walks_args=(--device cpu --lengths 256 --min-time 0.01)
      timeout "${WALKS_S:-40}" $PY benchmarks/triton_walks.py "${walks_args[@]}" 2>&1 |
        tee "$OUT/walks.txt"
      ;;
    bench)
      timeout "${BENCH_S:-280}" $PY benchmarks/gpu.py --only attention "${bench_args[@]}" \
        --out "$OUT/gpu.md" --json "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
      ;;
    autotune)
      ATTNKIT_TRITON_AUTOTUNE=1 timeout "${BENCH_S:-280}" $PY benchmarks/gpu.py --only attention \
        "${bench_args[@]}" --out "$OUT/gpu_autotune.md" --json "$OUT/gpu_autotune.json" \
        2>&1 | tee "$OUT/autotune.log"
      ;;
    ring)
      for blocks in triton tiled; do
        for docs in "" "--documents 16"; do
          # shellcheck disable=SC2086  # $docs: no option, or the option and its value
          timeout "${RING_S:-60}" $PY -m torch.distributed.run --nproc-per-node 1 \
            examples/ring_attention.py --seq "${RING_SEQ:-65536}" --dtype bfloat16 --backward \
            --backend "$blocks" $docs 2>&1 | tee -a "$OUT/ring.txt"
        done
      done
      cross="--kv-seq $((2 * ${RING_SEQ:-65536}))"  # cross-attention over twice as many keys
      for method in "--softcap 30" "--alibi" "--ulysses" "--hybrid 1" "$cross"; do
        # shellcheck disable=SC2086  # $method: the option and its value
        timeout "${RING_S:-60}" $PY -m torch.distributed.run --nproc-per-node 1 \
          examples/ring_attention.py --seq "${RING_SEQ:-65536}" --dtype bfloat16 --backward \
          $method 2>&1 | tee -a "$OUT/ring.txt"
      done
      timeout "${RING_S:-60}" $PY -m torch.distributed.run --nproc-per-node 1 \
        examples/sharded_decoding.py --context "${DECODE_CONTEXT:-1048576}" --dtype bfloat16 \
        2>&1 | tee -a "$OUT/ring.txt"
      for model in "" "--translate"; do  # a CausalLM's prompt, a Transformer's source
        # shellcheck disable=SC2086  # $model: no option, or the option
        timeout "${RING_S:-60}" $PY -m torch.distributed.run --nproc-per-node 1 \
          examples/sharded_generation.py --prompt 32768 --new 16 $model 2>&1 \
          | tee -a "$OUT/ring.txt"
      done
      ;;
    *)
      echo "unknown stage $stage (tests, decode, walks, bench, autotune, ring)"
      status=2
      continue
      ;;
  esac
  rc=$?
  [ $rc = 124 ] && echo "== $stage stopped at its time limit (what it saved is in $OUT)"
  [ $rc != 0 ] && status=$rc
done
exit $status
