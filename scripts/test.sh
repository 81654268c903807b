#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian/Ubuntu machine (system packages only when missing:
# Redis, PostgreSQL, espeak-ng, and chromium with its driver for the dashboard's browser test),
# then runs the default (fast) suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg_cmd in redis-server:redis-server espeak-ng:espeak-ng chromium:chromium chromium-driver:chromedriver; do
    command -v "${pkg_cmd#*:}" >/dev/null 2>&1 || need+=("${pkg_cmd%%:*}")
done
# PostgreSQL for the SQL CRM adapter's tests: Debian keeps initdb under /usr/lib/postgresql/*/bin.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    need+=(postgresql)
fi
if [ "${#need[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# torch is pinned so pip takes the CPU build from this machine's disk instead of a multi-GB CUDA build.
python3 -m pip install -q torch==2.13.0 -e ".[test]"

# The exact comparisons with the tiny fixture's recordings need PyTorch's AVX2 CPU kernels, whatever the CPU
# (AVX-512 and AMX kernels round bf16 ties differently); they must be set before torch is imported.
export ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

if [ "$#" -eq 0 ]; then
    set -- -m "not slow"
fi
exec python3 -m pytest -q "$@"
