#!/usr/bin/env bash
# Creates .venv/ in the repo root and installs hsd with its test dependencies.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q 'setuptools>=77.0.3,<81' wheel
.venv/bin/pip install -q torch==2.14.1
.venv/bin/pip install -q -e '.[dev]'
