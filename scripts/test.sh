#!/usr/bin/env bash
# Run the test suite (stock mergekit CLIs in subprocesses on tiny checkpoints).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
