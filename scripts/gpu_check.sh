#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/gpu_check.py): on a bare GPU machine with no network, install from a folder of
# wheels what hsd needs and the machine lacks (never touching its torch, lightning, transformers or peft), install hsd
# itself, then measure within 8 minutes on one GPU. Results: $OUT (default gpu_check/ in the repo).
#
#   bash scripts/gpu_check.sh                     # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run           # CPU, tiny models: checks the check (installs only what is missing)
#   bash scripts/gpu_check.sh --download-wheels   # on a machine with PyPI: fill the wheel folder (Python 3.12, x86_64)
#   bash scripts/gpu_check.sh --only tscd_sdxl dmd_sdxl --set tscd_sdxl.micro=[1,2]   # driver options pass through
#
# Environment: HSD_WHEELS (the wheel folder; default wheels/ in the repo), PYTHON (default .venv/bin/python if there,
# else python3), OUT, HSD_GPU_CHECK_BUDGET (seconds for everything, install included; default 480).
set -uo pipefail
START=$(date +%s)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WHEELS=${HSD_WHEELS:-$ROOT/wheels}
BUDGET=${HSD_GPU_CHECK_BUDGET:-480}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi

# What a machine with torch 2.11, lightning 2.6, transformers 5 and peft lacks of hsd's install_requires and their
# dependencies, as wheel==version:import name (resolved with pip against PyPI for Python 3.12 manylinux x86_64; 29 MB).
# torchao (model.quantize): 0.16.0, whose Python kernels run on any torch 2.x (its C++ extension is skipped on a torch
# it was not built for); hsd's own environment pins 0.18.0 for torch 2.14. Not yet run on a GPU (none lent).
# torchvision 0.26 pairs with torch 2.11: for another torch 2.N, download torchvision 0.(N+15) instead. tensorboard,
# matplotlib and scikit-learn are left out: the check uses none of them (a csv logger, no lab world).
PACKAGES="diffusers==0.42.1:diffusers omegaconf==2.4.0:omegaconf open_clip_torch==3.3.0:open_clip timm==1.0.31:timm
ftfy==6.3.1:ftfy wcwidth==0.9.4:wcwidth webdataset==1.0.2:webdataset braceexpand==0.1.7:braceexpand
torchmetrics==1.9.0:torchmetrics requests==2.34.2:requests urllib3==2.8.0:urllib3 idna==3.20:idna
certifi==2026.10.19.post1:certifi charset-normalizer==3.5.3:charset_normalizer importlib_metadata==10.2.0:importlib_metadata
zipp==4.1.2:zipp lazy-importer==0.1.0:lazy_importer pillow==13.0.0:PIL torchvision==0.26.0:torchvision
torchao==0.16.0:torchao"
BUILD=setuptools==80.10.2   # hsd's build backend, for `pip install -e .` without an index

if [ "${1:-}" = --download-wheels ]; then   # the one download, for Python $HSD_WHEELS_PYTHON (default 3.12)
  # shellcheck disable=SC2046
  exec "$PY" -m pip download --isolated --disable-pip-version-check --only-binary=:all: \
    --python-version "${HSD_WHEELS_PYTHON:-3.12}" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --no-deps -d "$WHEELS" $(for p in $PACKAGES; do printf '%s ' "${p%%:*}"; done) "$BUILD"
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the wheels whose module does not import; torchvision in the version that matches the machine's torch
MISSING=$(cd / && "$PY" - $PACKAGES <<'EOF'
import importlib.util, sys
from importlib import metadata
try:
    torch = metadata.version("torch")
except metadata.PackageNotFoundError:
    sys.exit("gpu_check: no torch in %s: the check uses the machine's own torch (set PYTHON)" % sys.executable)
for item in sys.argv[1:]:
    wheel, module = item.split(":")
    if importlib.util.find_spec(module) is None:   # torch 2.N pairs with torchvision 0.(N+15)
        print("torchvision==0.%d.*" % (int(torch.split(".")[1]) + 15) if module == "torchvision" else
              wheel.split("==")[0])
EOF
) || exit 2
MISSING=$(echo $MISSING)   # one line
INSTALLED=""
LOGDIR=${OUT:-$ROOT/gpu_check}
mkdir -p "$LOGDIR"
LOG="$LOGDIR/install.log"
: > "$LOG"
PIP=("$PY" -m pip install --isolated --no-index --find-links "$WHEELS" --no-deps --disable-pip-version-check)
if [ -n "$MISSING" ]; then
  echo "[gpu_check] installing from $WHEELS: $MISSING"
  if [ ! -d "$WHEELS" ]; then
    echo "[gpu_check] no wheel folder at $WHEELS: fill it on a machine with PyPI (bash scripts/gpu_check.sh" \
         "--download-wheels) and copy it here, or set HSD_WHEELS; the measurements will fail on imports" >&2
  elif "${PIP[@]}" $MISSING >>"$LOG" 2>&1; then
    INSTALLED="$MISSING"
  elif grep -q externally-managed "$LOG"; then   # a system Python (PEP 668): beside it, not into it
    SITE="$ROOT/.gpu_check_site"
    echo "[gpu_check] this Python's packages are externally managed: installing into $SITE"
    "${PIP[@]}" --target "$SITE" $MISSING >>"$LOG" 2>&1 && INSTALLED="$MISSING"
    export PYTHONPATH="$SITE:$PYTHONPATH"
  fi
  [ -n "$INSTALLED" ] || { echo "[gpu_check] installing failed ($LOG):" >&2; tail -5 "$LOG" >&2; }
fi
# hsd itself, editable and without dependencies, unless this checkout already is the installed hsd
if ! (cd / && env -u PYTHONPATH "$PY" -c 'import json, sys; from importlib import metadata
url = json.loads(metadata.distribution("hsd").read_text("direct_url.json") or "{}").get("url", "")
sys.exit(url.rstrip("/") != "file://" + sys.argv[1])' "$ROOT" 2>/dev/null); then
  if [ -z "${SITE:-}" ] && "${PIP[@]}" -e "$ROOT" >>"$LOG" 2>&1; then
    INSTALLED="$INSTALLED hsd(editable)"
  else
    echo "[gpu_check] hsd not installed ($LOG): it runs from this checkout through PYTHONPATH"
  fi
fi
export HSD_GPU_CHECK_INSTALLED="${INSTALLED# }" HSD_GPU_CHECK_INSTALL_S=$(( $(date +%s) - START ))
exec "$PY" benchmarks/gpu_check.py --budget $(( BUDGET - ($(date +%s) - START) - 5 )) "$@"
