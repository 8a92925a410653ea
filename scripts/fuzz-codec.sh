#!/usr/bin/env bash
# Builds the codec's C kernels with AddressSanitizer and UndefinedBehaviorSanitizer in a scratch copy of the
# checkout and runs scripts/fuzz_codec.py against them, then the codec's own tests. Needs gcc and a venv with kvmart's
# test extras (default .venv). Usage: scripts/fuzz-codec.sh [SECONDS] [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$PWD/.venv/bin/python}"
seconds="${1:-120}"
shift || true
seeds=("${@:-1}")
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
git ls-files -co --exclude-standard | tar cf - -T - | tar xf - -C "$scratch"
rm -f "$scratch"/kvmart/codec/_kernels*.so
(cd "$scratch" && CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -g" \
    LDFLAGS="-fsanitize=address,undefined" "$python" setup.py -q build_ext --inplace >/dev/null)
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cd "$scratch"
for seed in "${seeds[@]}"; do PYTHONPATH="$scratch" "$python" scripts/fuzz_codec.py --seed "$seed" --seconds "$seconds"; done
PYTHONPATH="$scratch" "$python" -m pytest -q -p no:cacheprovider tests/test_codec.py tests/test_codec_kernels.py
