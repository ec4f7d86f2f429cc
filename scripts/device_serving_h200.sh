#!/usr/bin/env bash
# The serving chapter's H200 measurements, in two device calls (benchmarks/serving_h200.py says what each holds).
#
#   run from the repository root on the device machine, after the wheels are installed (see the report / the
#   chapter's device notes):
#     PART=1 bash scripts/device_serving_h200.sh    # ~7.5 min: breakdown under load, optimizations (GPU side)
#     PART=2 bash scripts/device_serving_h200.sh    # ~7 min: fair comparison, two-DNN pipeline, Redis durability
#     PART=2 STEPS=pipeline,durability bash ...      # resume: only the steps named
#   dry run on a machine without CUDA (GPU designs skipped with a message, results under data/results/serving/ci/):
#     PART=1 SCALE=ci bash scripts/device_serving_h200.sh
#
# Needs (git-ignored, carried): .whl (litserve and friends, redis, simplejpeg), .device-carry/deb (redis-server and
# its libraries, unpacked here with dpkg -x), .devcache/assets/wallpapers (the photographs) and
# .devcache/assets/mobilenet-v2 (the pipeline's ImageNet weights). Copies the part's results files and its log to
# $OUT (at most 8 files; a file over 2 MB gzipped: gunzip it into data/results/serving/).
set -uo pipefail
PART=${PART:?set PART=1 or PART=2}
SCALE=${SCALE:-full}
SUFFIX=${SUFFIX:-_h200}
OUT=${OUT:-/tmp/serving_h200_out}
mkdir -p "$OUT"
LOG="$OUT/serving_h200_part${PART}.log"
export EFFLLM_CACHE=${EFFLLM_CACHE:-$PWD/.devcache}
export PYTHONUNBUFFERED=1
# this tree's effllm_lib, never an installed copy (a script in benchmarks/ puts benchmarks/ first on the path)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${EFFLLM_COMMIT:-}" ]; then
  EFFLLM_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  export EFFLLM_COMMIT
fi
{
  echo "serving H200 part $PART, scale $SCALE, commit $EFFLLM_COMMIT, $(date -u +%FT%TZ), $(nproc) cores"
  nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
} | tee "$LOG"

# redis-server from the Debian packages (the device image has none): unpacked, never installed
if ! command -v redis-server >/dev/null 2>&1 && ls .device-carry/deb/redis-server_*.deb >/dev/null 2>&1; then
  mkdir -p /tmp/redis-deb
  for deb in .device-carry/deb/*.deb; do dpkg -x "$deb" /tmp/redis-deb; done
  export PATH="/tmp/redis-deb/usr/bin:$PATH"
  export LD_LIBRARY_PATH="/tmp/redis-deb/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if command -v redis-server >/dev/null 2>&1; then
  redis-server --version 2>&1 | tee -a "$LOG"
  ldd "$(command -v redis-server)" 2>/dev/null | grep "not found" | tee -a "$LOG"
else
  echo "redis-server not found: the Redis parts are skipped" | tee -a "$LOG"
fi
# fail in seconds, not minutes, when a carried wheel or the GPU stack is missing
python3 - <<'PY' 2>&1 | tee -a "$LOG" || { echo "missing Python packages (install the .whl wheels first)"; exit 3; }
import importlib, sys
missing = []
for m in ("litserve", "fastapi", "uvicorn", "python_multipart", "zmq", "simplejpeg", "redis", "prometheus_client",
          "pandas", "torch"):
    try:
        importlib.import_module(m)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{m} ({type(exc).__name__}: {exc})")
try:
    import torchvision, torch
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}")
except Exception as exc:  # noqa: BLE001
    print(f"torchvision not importable ({exc}): the GPU decode designs will be skipped")
if missing:
    print("missing: " + "; ".join(missing))
    sys.exit(1)
PY
[ -d "$EFFLLM_CACHE/assets/wallpapers" ] || echo "WARNING: $EFFLLM_CACHE/assets/wallpapers is missing (carry it)" | tee -a "$LOG"

python3 benchmarks/serving_h200.py --part "$PART" --scale "$SCALE" --suffix "$SUFFIX" ${STEPS:+--steps "$STEPS"} \
  2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}

# this part's results files (7 at most) beside the log
case "$PART" in
  1) names="breakdown_loaded breakdown_loaded_requests breakdown_loaded_throughput optimizations optimizations_runs" ;;
  2) names="fair fair_runs pipeline_summary pipeline_crops durability durability_runs" ;;
esac
dir=data/results/serving
[ "$SCALE" = full ] || dir=data/results/serving/ci
for n in $names; do
  f="$dir/$n$SUFFIX.csv"
  if [ ! -f "$f" ]; then echo "not written: $f" | tee -a "$LOG"
  elif [ "$(stat -c %s "$f")" -gt 2000000 ]; then gzip -c "$f" > "$OUT/$(basename "$f").gz"  # per-request rows
  else cp "$f" "$OUT/"; fi
done
ls -la "$OUT"
exit "$rc"
