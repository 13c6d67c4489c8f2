#!/usr/bin/env bash
# The GPU machines run triton 3.6; scripts/setup.sh installs the newest (3.9 today).
# Run the Triton kernel tests once more, under the interpreter, with triton 3.6 in a
# second venv, so both versions stay supported. Uses the extension that
# scripts/setup.sh built in the source tree (same torch), so run that first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv36/bin/python ] || "$PY" -m venv .venv36
pip_install() { .venv36/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored" >&2); }
pip_install "${OMNIFM_TORCH:-torch==2.13.0}" "triton==3.6.*" numpy hypothesis pytest
.venv36/bin/python -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
.venv36/bin/python -m pytest -q -p no:cacheprovider tests/ops -k triton "$@"
