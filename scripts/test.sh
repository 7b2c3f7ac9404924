#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh
.venv/bin/python -m pytest -q -m "not gpu"
