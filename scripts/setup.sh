# Sourced by demo.sh and test.sh: make ./.venv with the CPU build of torch, mergekit
# and this package (editable, with the test extras). Re-running it is cheap.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.nearswap-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch first, pinned: this version is the local CPU build; an unpinned torch
    # requirement would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q hatchling
    .venv/bin/python -m pip install -q -e ".[test,plot]"
    echo "$want" > "$stamp"
fi
