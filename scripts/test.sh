#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh
bash scripts/install_mmdet.sh   # mmcv is built once (about 13 min) and cached in .cache/wheels
.venv/bin/python -m pytest -q -m "not gpu"
