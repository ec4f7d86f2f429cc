#!/usr/bin/env bash
# Short device calls for SparAMX (#15) and BitMoD accuracy (#16), one PART per `run` call (each < 9.5 min).
# Run from the repository root on the device machine, from a clean committed tree:
#
#   EFFLLM_COMMIT=<sha> PART=kv_e2e bash scripts/device_calls.sh       # ~4.5 min, Xeon: sparse-KV end to end
#   EFFLLM_COMMIT=<sha> PART=kv_attention bash scripts/device_calls.sh # ~3 min, Xeon: sparse-KV attention alone
#   EFFLLM_COMMIT=<sha> PART=bitmod_train bash scripts/device_calls.sh # ~8-9 min, GPU: 100M LM + RTN/clip/act sweep
#   EFFLLM_COMMIT=<sha> PART=bitmod_more bash scripts/device_calls.sh  # <= 9 min each, GPU: + AWQ/GPTQ, resumed;
#                                                                      # repeat until the log says the sweep is complete
# bitmod_* parts need carry [".device-carry/bitmod"] (tokenizer, wiki.txt, austen.txt); bitmod_more needs the
# model bitmod_train left in /tmp on the same warm machine (a machine is taken back after 30 min held: then start
# again with bitmod_train and a new TAG, since a GPU retrain need not give the same weights and --resume refuses).
# Timing parts (kv_*) must run alone on the machine. Every part copies its results and log under $OUT.
#
#   PART=kv_e2e SCALE=ci KV_KERNEL=auto PATH=.venv/bin:$PATH bash scripts/device_calls.sh   # dry run here (ci/)
#   PART=bitmod_train SCALE=ci PRESET=ci DEVICE=cpu PATH=.venv/bin:$PATH bash scripts/device_calls.sh
set -uo pipefail
PART=${PART:?set PART to kv_e2e, kv_attention, bitmod_train or bitmod_more}
SCALE=${SCALE:-full}
TAG=${TAG:-h200all}
PRESET=${PRESET:-100m}       # a dry run on CPU: PRESET=ci DEVICE=cpu SCALE=ci
DEVICE=${DEVICE:-cuda}
KV_KERNEL=${KV_KERNEL:-avx512}   # the Xeon's; a dry run on another CPU: KV_KERNEL=auto
OUT=${OUT:-/tmp/device_calls_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 EFFLLM_DIRTY=${EFFLLM_DIRTY:-0}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export EFFLLM_COMMIT=${EFFLLM_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
T0=$(date +%s)
LOG="$OUT/$PART.log"
echo "part $PART, scale $SCALE, commit $EFFLLM_COMMIT, $(date -u +%FT%TZ), $(nproc) cores" | tee "$LOG"

bitmod_sweep() {   # $1: calibrations, $2: minutes left for the sweep
  python -m effllm_lib.bitmod.accuracy --model wiki-llama-100m --model-dir "$MODEL" \
    --text "wikipedia_heldout=$MODEL/heldout.txt" --calib-text "$DATA/austen.txt" --bits 3,4 \
    --methods int_asym,nf4,iq4_nl,ant,olive,bitmod --clip 0,1 --calibration "$1" --seq-len 512 \
    --kl-windows 100000 --batch-size 8 --device "$DEVICE" --out "$RES" --tag "$TAG" --scale "$SCALE" \
    --resume --max-minutes "$2" 2>&1 | tee -a "$LOG"
  cp "$RES"/*.csv "$OUT"/ 2>/dev/null
}

minutes_left() {   # of a 9-minute call, less what has run
  python3 -c "import time; print(round((540 - (time.time() - $T0)) / 60, 2))"
}

case "$PART" in
  kv_e2e)
    ctx=4096,16384; [ "$SCALE" = ci ] && ctx=256
    timeout 540 python benchmarks/sparse_kv_attention.py --scale "$SCALE" --part e2e --contexts "$ctx" \
      --kernels "$KV_KERNEL" --suffix _xeon 2>&1 | tee -a "$LOG"
    d=data/results/sparamx; [ "$SCALE" = ci ] && d=$d/ci
    cp "$d"/kv_decode_latency_xeon.csv "$d"/kv_scorecard_xeon.csv "$OUT"/ 2>/dev/null
    ;;
  kv_attention)
    timeout 540 python benchmarks/sparse_kv_attention.py --scale "$SCALE" --part attention --kernels "$KV_KERNEL" \
      --suffix _xeon 2>&1 | tee -a "$LOG"
    d=data/results/sparamx; [ "$SCALE" = ci ] && d=$d/ci
    cp "$d"/kv_attention_latency_xeon.csv "$OUT"/ 2>/dev/null
    ;;
  bitmod_train|bitmod_more)
    DATA=/tmp/data/bitmod MODEL=/tmp/wiki-llama-100m RES=/tmp/res/bitmod
    [ "$SCALE" = ci ] && MODEL=/tmp/ci-wiki-llama RES=/tmp/res/bitmod-ci
    mkdir -p "$DATA" "$RES"
    cp -a .device-carry/bitmod/. "$DATA"/ || { echo "carry .device-carry/bitmod" | tee -a "$LOG"; exit 1; }
    if [ "$PART" = bitmod_train ]; then
      python -m effllm_lib.train_lm --scale full --preset "$PRESET" --device "$DEVICE" --results-scale "$SCALE" --tokenizer "$DATA/tok" --text "$DATA/wiki.txt" \
        --extra-text "$DATA/austen.txt" --out "$MODEL" --max-minutes 6 2>&1 | tr '\r' '\n' | grep -v "it/s" \
        | tee -a "$LOG"
      cp data/results/bitmod/train_wiki-llama-100m.csv "$OUT"/ 2>/dev/null
      grep -q '"finished": true' "$MODEL/train_config.json" || { echo "training did not finish" | tee -a "$LOG"; exit 1; }
      bitmod_sweep none,act "$(minutes_left)"
    else
      test -f "$MODEL/config.json" || { echo "model lost: run PART=bitmod_train with a new TAG" | tee -a "$LOG"; exit 1; }
      bitmod_sweep none,act,awq,gptq 8.5
    fi
    ;;
  *)
    echo "unknown PART $PART" >&2; exit 2 ;;
esac
echo "part $PART done in $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
