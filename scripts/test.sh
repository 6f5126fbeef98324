#!/usr/bin/env bash
# Run the test suite (stock mergekit CLIs in subprocesses on tiny checkpoints).
# MERGEKIT_VERSION=0.1.4 runs it against mergekit 0.1.4 in its own environment.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q --durations=12 "$@"
