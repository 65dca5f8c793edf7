#!/usr/bin/env bash
# The GPU machine's check in one command: install the carried CUDA wheel, run the
# `cuda` tests, and benchmark mlmf against PyTorch on the GPU. Everything it writes
# (log, test report, markdown table) goes to --out (default: $OUT, else ./device-check).
#
#   scripts/device_check.sh                  # on the GPU machine (wheel from dist-cuda/)
#   scripts/device_check.sh --device cpu     # the same steps here, on the CPU
#
# Options: --device cuda|cpu, --out DIR, --wheel PATH (default: dist-cuda/*.whl, or for
# --device cpu dist/*.whl, else the development build under python/), --quick (short
# benchmark samples). It needs a Python with numpy, torch and transformers; pytest comes
# from target/device-wheels/ (`make device-wheels`) when that Python lacks it. Nothing is
# downloaded. Exit status: non-zero when a test failed or no benchmark row was timed.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
OUT_DIR="${OUT:-$PWD/device-check}"
WHEEL=""
QUICK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --wheel) WHEEL="$2"; shift 2 ;;
    --quick) QUICK="--quick"; shift ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "--device must be cuda or cpu" >&2; exit 2 ;; esac

PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/device_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - START )) s)"; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

step "machine"
uname -a
"$PY" --version
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi failed"
fi

step "mlmf"
if [ -z "$WHEEL" ]; then
  if [ "$DEVICE" = cuda ]; then WHEEL="$(ls dist-cuda/*.whl 2>/dev/null | head -1)"
  else WHEEL="$(ls dist/*.whl 2>/dev/null | head -1)"; fi
fi
SITE="$WORK/site"
if [ -n "$WHEEL" ]; then
  echo "installing $WHEEL into $SITE"
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEEL" || exit 1
  export PYTHONPATH="$SITE"
elif [ "$DEVICE" = cpu ] && ls python/mlmf/_mlmf*.so >/dev/null 2>&1; then
  echo "no wheel: using the development build under python/"
  export PYTHONPATH="$PWD/python"
else
  echo "no wheel found (build one with \`maturin build --release --features python,cuda\` into dist-cuda/, or pass --wheel)"; exit 1
fi
if ! "$PY" -c "import pytest" 2>/dev/null; then
  if ls target/device-wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" target/device-wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "pytest is missing and target/device-wheels/ holds none (\`make device-wheels\`)"; exit 1
  fi
fi

if [ "$DEVICE" = cuda ]; then
  # The CUDA runtime, cuBLAS and cuRAND libraries of the nvidia-* wheels installed
  # beside torch: mlmf loads them at run time (the wheel links none of them).
  LIBS="$("$PY" - <<'EOF'
import glob, importlib.util, os
spec = importlib.util.find_spec("nvidia")
dirs = []
for base in (spec.submodule_search_locations if spec else []):
    for so in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True):
        d = os.path.dirname(so)
        if d not in dirs:
            dirs.append(d)
print(":".join(dirs))
EOF
)"
  export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "CUDA libraries from: ${LIBS:-nowhere (no nvidia-* wheels found)}"
fi
"$PY" -c "import mlmf; print('mlmf', mlmf.__version__, 'from', mlmf.__file__, '; CUDA build:', mlmf.CUDA_COMPILED)" || exit 1

step "tests marked cuda"
# On the CPU the tests run with the CPU standing in for the GPU (tests/test_cuda.py).
if [ "$DEVICE" = cpu ]; then export MLMF_TEST_GPU=cpu; fi
"$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -rs \
  --junitxml="$OUT_DIR/cuda-tests.xml"
TESTS=$?

step "benchmark ($DEVICE)"
"$PY" benchmarks/gpu.py --device "$DEVICE" --out "$OUT_DIR/gpu.md" $QUICK
BENCH=$?

step "done"
echo "tests: exit $TESTS; benchmark: exit $BENCH; wrote $OUT_DIR/gpu.md, $OUT_DIR/cuda-tests.xml, $LOG"
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ]
