#!/usr/bin/env bash
# The engine's GPU check, one command on a machine with an NVIDIA GPU (under 8 minutes on an H100/H200):
#   bash scripts/gpu-check.sh
# runs the CUDA-only tests (CUDA graphs replay the eager step exactly), then bench/engine.py at the
# published sizes with random weights: step time by batch size eager and graphed, sessions held in real
# time, prefill time of the 134-position prompt, and the churn scenario (live calls while new calls are
# primed, whole versus chunked). Record its output in bench/README.md.
#
#   bash scripts/gpu-check.sh --device cpu --size tiny    # the dry run the test suite makes on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
size=real
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --size) size="$2"; shift 2 ;;
        *) echo "gpu-check.sh: unknown argument $1 (use --device D --size tiny|real)" >&2; exit 2 ;;
    esac
done

python3 -c "import torch" 2>/dev/null || { echo "gpu-check.sh: torch is not installed" >&2; exit 2; }
echo "== duplexgate GPU check: device $device, size $size, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
python3 -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda,
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"

if [ "$device" = cpu ]; then
    # The dry run: the same steps at the tiny size, kept short so the suite can afford it.
    python3 -m pytest -q -p no:cacheprovider tests/test_engine_graphs.py
    python3 bench/engine.py --device cpu --size "$size" --capacity 4 --batches 1,2,4 --steps 2 --warmup 1 \
        --prefill-repeats 1 --no-busy-core --churn 4 --churn-calls 2
else
    python3 -m pytest -q -p no:cacheprovider tests/test_engine_graphs.py tests/test_engine_runner.py
    python3 bench/engine.py --device "$device" --size "$size" --capacity 32 --batches 1,2,4,8,16,32 \
        --steps 15 --churn 30 --churn-calls 16
fi
echo "== gpu-check done"
