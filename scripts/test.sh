#!/usr/bin/env bash
# Run the test suite (stock mergekit CLIs in subprocesses on tiny checkpoints).
# MERGEKIT_VERSION=0.1.4 runs it against mergekit 0.1.4 in its own environment.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# mergekit's own tests, from the sdist of the installed version (test_mergekit_upstream.py
# skips, saying so, where they could not be fetched).
bash scripts/fetch-mergekit-tests.sh "$VENV" || echo "could not fetch mergekit's own tests" >&2
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q --durations=12 "$@"
