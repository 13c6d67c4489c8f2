#!/usr/bin/env bash
# Create .venv and install omnifm with everything it needs, from scratch.
# torch is pinned to the CPU build that lies on this machine's disk (an unpinned
# torch would pull a multi-GB CUDA build); the extension is built against it without
# build isolation, which would fetch a second torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${OMNIFM_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's exit status is kept; only the noise about this machine's local index is dropped.
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored" >&2); }
pip_install --upgrade setuptools wheel
pip_install "$TORCH_SPEC"
pip_install -r requirements.txt
pip_install --no-deps "medmnist>=3"
pip_install --no-deps "peft>=0.21" accelerate
pip_install "flwr>=1.20"  # the Flower extra (omnifm.fl.flower and its tests); it leaves torch alone
pip_install --no-build-isolation -e .
.venv/bin/python -c "import torch, omnifm, omnifm_ext; assert omnifm_ext.AVAILABLE, omnifm_ext.LOAD_ERROR; print('omnifm ready: torch', torch.__version__)"
