#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py) as one command for the lent GPU machine; see benchmarks/README.md.
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine: carry [".whl", ".gpu_data"], timeout_s 540
#   bash benchmarks/gpu_check.sh --cpu-smoke    # here: every configuration for a few steps on CPU, .venv's python
#   bash benchmarks/gpu_check.sh --parts blocks --seed-start 2023 --seeds 1    # extra arguments go to gpu_check.py
#
# On the GPU machine it installs the carried wheels (.whl, from benchmarks/prepare_gpu_wheels.sh) into /tmp/site
# and nothing from the network, runs ctrlab from this checkout through PYTHONPATH (no pip install -e), prints the
# GPU and the torch/CUDA versions, and runs gpu_check.py within $GPU_CHECK_BUDGET_S seconds (default 450, counted
# from this script's start; a hard stop 40 s later), writing gpu_check.jsonl, gpu_check.log, summary.md and
# blocks/synthetic_autoint.json under $OUT (runs/gpu_check when OUT is unset). It ends with the summary table.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
START=$(date +%s)
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--cpu-smoke" ]; then
  shift
  PY=.venv/bin/python
  OUTDIR=${OUT:-runs/gpu_check_smoke}
  BUDGET=${GPU_CHECK_BUDGET_S:-170}
  MODE=(--device cpu --smoke)
else
  PY=python3
  OUTDIR=${OUT:-runs/gpu_check}
  BUDGET=${GPU_CHECK_BUDGET_S:-450}
  MODE=(--device cuda)
fi
mkdir -p "$OUTDIR"
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1
TEE=$!

if [ "${MODE[1]}" = cuda ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "error: installing the carried wheels failed"; exit 3; }
    export PYTHONPATH=/tmp/site
  else
    echo "warning: no .whl/*.whl here (carry .whl; make it with benchmarks/prepare_gpu_wheels.sh)"
  fi
  [ -d .gpu_data/frappe/x1 ] && export CTRLAB_DATA_DIR=$PWD/.gpu_data
  echo "nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
"$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}; \
CUDA {torch.version.cuda}; cuda available: {torch.cuda.is_available()}")'

rm -f "$OUTDIR/summary.md"  # gpu_check.py writes it at its end, also when interrupted
left=$((BUDGET - ($(date +%s) - START)))
echo "wheels and environment ready after $((BUDGET - left)) s; gpu_check.py gets ${left} s"
timeout -k 10 -s INT $((left + 40)) "$PY" benchmarks/gpu_check.py "${MODE[@]}" --out "$OUTDIR" --budget-s "$left" "$@"
rc=$?
if [ ! -s "$OUTDIR/summary.md" ] && [ -s "$OUTDIR/gpu_check.jsonl" ]; then  # killed before its summary
  echo "gpu_check.py ended with status $rc before its summary; what it recorded:"
  "$PY" benchmarks/gpu_check.py --summarize "$OUTDIR/gpu_check.jsonl" | tee "$OUTDIR/summary.md"
fi
echo "gpu_check: exit $rc after $(($(date +%s) - START)) s; results in $OUTDIR"
exec >&- 2>&-
wait "$TEE" 2>/dev/null  # the log complete before the command returns
exit "$rc"
