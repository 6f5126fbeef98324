# Sourced by demo.sh and test.sh: make a virtual environment with the CPU build of
# torch, mergekit and this package (editable, with its test extras). Re-running it
# is cheap. MERGEKIT_VERSION=0.1.4 makes ./.venv-mergekit-0.1.4 instead of ./.venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
MERGEKIT_VERSION=${MERGEKIT_VERSION:-0.1.5}
case "$MERGEKIT_VERSION" in
    0.1.5) VENV=.venv; EXTRA=() ;;
    # mergekit 0.1.4 needs transformers 4.x
    0.1.4) VENV=.venv-mergekit-0.1.4; EXTRA=("transformers<5") ;;
    *) echo "MERGEKIT_VERSION must be 0.1.4 or 0.1.5" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp=$VENV/.nearswap-setup
# The hook files are copied into site-packages even by an editable install.
want=$(cat pyproject.toml scripts/setup.sh nearswap_mergekit_hook.* | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch first, pinned: this version is the local CPU build; an unpinned torch
    # requirement would pull a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q hatchling
    "$VENV/bin/python" -m pip install -q -e ".[test,plot]" "mergekit==$MERGEKIT_VERSION" "${EXTRA[@]}"
    echo "$want" > "$stamp"
fi
