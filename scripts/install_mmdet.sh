#!/usr/bin/env bash
# mmdet 3.3.0 + mmcv 2.1.0 (the newest mmcv that mmdet 3.3.0 accepts) into .venv, for the feedback stage's
# SOLO instance loss. PyPI has mmcv 2.1.0 only as source, and that source fails against torch 2.14's headers
# until its setup.py asks for C++20 instead of C++14/17; so this script patches that one flag, builds the wheel
# against the installed torch (about 12 min on 2 idle cores) and caches it, keyed by mmcv, torch and Python:
#
#   bash scripts/install_mmdet.sh            # build once (or reuse ~/.cache/hsd/wheels/...), then install
#   HSD_WHEEL_CACHE=/shared/wheels bash scripts/install_mmdet.sh   # another cache folder (e.g. shared by machines)
# The default cache is per user, not per checkout, so every clone on a machine (CI's too) reuses one build.
#
# Needs setuptools<81 in .venv (pkg_resources; setup.sh pins it) and a C++ compiler. CPU ops only: on a GPU,
# set FORCE_CUDA=1 to build mmcv's CUDA kernels (the cache key then says cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# pip names every local index folder that lacks a package; keep its real messages only
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
PIP=(quiet .venv/bin/pip install -q)
MMCV=2.1.0
KEY=$($PY -c 'import sys, torch; print("torch%s-py%d%d" % (torch.__version__.split("+")[0], *sys.version_info[:2]))')
[ "${FORCE_CUDA:-0}" = 1 ] && KEY="$KEY-cuda"
CACHE="${HSD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hsd/wheels}/mmcv-$MMCV-$KEY"
mkdir -p "$CACHE"
if ! ls "$CACHE"/mmcv-$MMCV-*.whl >/dev/null 2>&1; then
  echo "building mmcv $MMCV against $KEY (cached afterwards in $CACHE)"
  start=$(date +%s)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "${PIP[@]}" ninja 'setuptools>=77.0.3,<81' wheel
  quiet .venv/bin/pip download -q --no-deps --no-binary :all: "mmcv==$MMCV" -d "$work"
  tar xzf "$work/mmcv-$MMCV.tar.gz" -C "$work"
  sed -i 's/-std=c++1[47]/-std=c++20/g' "$work/mmcv-$MMCV/setup.py"
  grep -q -- "-std=c++20" "$work/mmcv-$MMCV/setup.py" || { echo "install_mmdet: the C++20 patch did not apply" >&2; exit 1; }
  PATH="$PWD/.venv/bin:$PATH" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    quiet .venv/bin/pip wheel -q --no-deps --no-build-isolation "$work/mmcv-$MMCV" -w "$work/dist"
  cp "$work"/dist/mmcv-$MMCV-*.whl "$CACHE/"
  echo "mmcv $MMCV built in $(( $(date +%s) - start )) s"
fi
"${PIP[@]}" --no-deps "$CACHE"/mmcv-$MMCV-*.whl
# mmcv's own runtime needs (its metadata asks for opencv-python; the headless build serves a server)
"${PIP[@]}" addict yapf opencv-python-headless 'mmengine>=0.10,<1' 'mmdet==3.3.0'
$PY -c 'import mmcv, mmdet, mmcv.ops; print("mmcv", mmcv.__version__, "(ops compiled) mmdet", mmdet.__version__)'
