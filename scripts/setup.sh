#!/usr/bin/env bash
# Create .venv and install Galvatron-DS with everything it needs (CPU or GPU machine).
# torch is installed first at a version requirements.txt admits, so no other package pulls a newer one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e . -r requirements-dev.txt
# sshd + pdsh for the two-host launcher test (only as root and only when missing; see docs/multinode.md)
bash scripts/install_multinode_deps.sh
.venv/bin/python -c "import torch, deepspeed, megatron.core, transformers; print('galvatron-ds ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)" 2>/dev/null | tail -1
