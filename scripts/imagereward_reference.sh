#!/usr/bin/env bash
# The pinned REFERENCE environment for ImageReward parity: the image-reward==1.5 package on its own old stack
# (transformers 4.x, timm 0.6, fairscale), kept apart from our .venv (transformers 5, where the package no longer
# imports). It writes tests/fixtures/imagereward_golden.json by running the package's own ImageReward.score on a
# synthetic checkpoint (scripts/imagereward_golden.py); tests/test_imagereward.py checks our scorer against it.
#
#   bash scripts/imagereward_reference.sh            # build the venv if missing, then regenerate the fixture
#   bash scripts/imagereward_reference.sh --env-only # only build / verify the venv
#
# The venv lives in .cache/ir-ref-venv (ignored by .cache/.gitignore) and is reused when it already imports
# ImageReward. Needs only PyPI (torch/torchvision come from this machine's local wheel index via pip's config).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=.cache/ir-ref-venv
mkdir -p .cache
[ -f .cache/.gitignore ] || printf '*\n' > .cache/.gitignore

# Pins. torch/torchvision match our .venv so that the synthetic images and weights are bit-identical on both sides;
# pillow matches too (the bicubic resize is part of what is compared).
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
PILLOW_PIN=$("$ROOT/.venv/bin/python" -c 'import PIL; print("pillow==" + PIL.__version__)' 2>/dev/null || echo pillow)
STACK_PINS=(
  transformers==4.55.4 huggingface-hub==0.36.2 "tokenizers>=0.21,<0.22"
  timm==0.6.13 fairscale==0.4.13 ftfy regex tqdm
  # only because `import ImageReward` imports ImageReward.ReFL, which imports these at module level
  diffusers==0.35.2 accelerate datasets
)

# pip warns about every local index folder that lacks a package; keep the real messages only
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
ok() { [ -x "$VENV/bin/python" ] && (cd /tmp && "$ROOT/$VENV/bin/python" -c 'import ImageReward' >/dev/null 2>&1); }

if ok; then
  echo "reference env: reusing $VENV"
else
  echo "reference env: building $VENV"
  start=$(date +%s)
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  PIP=(pip_quiet "$VENV/bin/pip" install -q)
  "${PIP[@]}" 'setuptools>=77.0.3,<81' wheel
  "${PIP[@]}" "${TORCH_PINS[@]}" "$PILLOW_PIN"
  "${PIP[@]}" "${TORCH_PINS[@]}" "$PILLOW_PIN" "${STACK_PINS[@]}"
  # openai-clip is an sdist whose setup.py needs pkg_resources (setuptools<81) and torch: build without isolation
  "${PIP[@]}" --no-build-isolation "${TORCH_PINS[@]}" openai-clip
  "${PIP[@]}" --no-deps image-reward==1.5
  end=$(date +%s)
  "$VENV/bin/pip" freeze > "$VENV/FREEZE.txt"
  echo "install_seconds=$((end - start))" > "$VENV/INSTALL_TIME.txt"
  echo "reference env: installed in $((end - start)) s"
  ok || { echo "reference env: 'import ImageReward' still fails:"; (cd /tmp && "$ROOT/$VENV/bin/python" -c 'import ImageReward'); exit 1; }
fi
(cd /tmp && "$ROOT/$VENV/bin/python" -c 'import ImageReward, transformers, torch, timm; print("import ImageReward OK:", "transformers", transformers.__version__, "torch", torch.__version__, "timm", timm.__version__)' 2>/dev/null)

[ "${1:-}" = "--env-only" ] && exit 0
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" scripts/imagereward_golden.py --out tests/fixtures/imagereward_golden.json
