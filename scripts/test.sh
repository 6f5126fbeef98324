#!/usr/bin/env bash
# Run the test suite (stock mergekit CLIs in subprocesses on tiny checkpoints).
# MERGEKIT_VERSION picks the environment (see setup.sh) and what runs there:
#   0.1.5        the whole suite
#   0.1.4, main  the tests that run mergekit (-m mergekit); the others do not use
#                mergekit and run once, with the 0.1.5 suite (elsewhere they skip)
#   mergekitty   tests/test_mergekitty.py (the rest of the suite needs mergekit)
# Arguments go to pytest; with mergekitty they replace the default selection.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
selection=()
case "$MERGEKIT_VERSION" in
    0.1.4 | 0.1.5)
        # mergekit's own tests, from the sdist of the installed version
        # (test_mergekit_upstream.py skips, saying so, where they could not be fetched).
        bash scripts/fetch-mergekit-tests.sh "$VENV" || echo "could not fetch mergekit's own tests" >&2
        [ "$MERGEKIT_VERSION" = 0.1.5 ] || selection=(-m mergekit)
        ;;
    # No sdist to fetch: setup.sh unpacked main's own tests from the snapshot.
    main) selection=(-m mergekit) ;;
    # test_mergekit_upstream.py runs mergekit's suite, not mergekitty's.
    mergekitty) [ $# -gt 0 ] || selection=(tests/test_mergekitty.py) ;;
esac
# -rfEs: failures, errors and each skip's reason in the summary.
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -rfEs --durations=12 "${selection[@]}" "$@"
