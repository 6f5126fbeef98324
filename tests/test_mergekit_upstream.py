"""mergekit's own test suite, from the sdist of the installed version, with the plugin live.

The suite runs twice in subprocesses of this interpreter: with the start-up hook
switched off, then with it on. Unpack the tests first with
``scripts/fetch-mergekit-tests.sh VENV``.
"""

import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import MERGEKIT_VERSION, ON_MERGEKIT_015, REPO

SUITE = Path(sys.prefix) / f"mergekit-tests-{MERGEKIT_VERSION}"
PLUGIN_DIR = REPO / "tests" / "upstream"
METHOD = "nearswap_chain"

# Files left out: every one of their tests needs tests/common.py (the tiny model
# factories make_picollama/make_gpt2size/... and run_and_check_merge), which only
# mergekit's repository has. With mergekit_sdist_plugin standing in for it they would
# collect, but all their tests would skip. Other files that use those helpers in some
# tests only (0.1.5: test_embedding_truncation, test_merge_dtypes) run, and the tests
# that need a helper skip with that reason.
EXCLUDED = [
    "tests/test_basic_merges.py",
    "tests/test_chat_template.py",
    # Stays on disk: test_vocabulary_axis imports make_tokenizer from it.
    "tests/test_tokenizer.py",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SUITE / "tests").is_dir(),
        reason=f"mergekit {MERGEKIT_VERSION}'s tests are not unpacked in {SUITE} "
        f"(scripts/fetch-mergekit-tests.sh {sys.prefix})",
    ),
]


class Run:
    """One run of the suite: {node id: outcome}, the methods registered, the time taken."""

    def __init__(self, name, hook, scratch):
        env = {k: v for k, v in os.environ.items() if k != "NEARSWAP_MERGEKIT_NO_HOOK"}
        env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN_DIR), env.get("PYTHONPATH")]))
        if not hook:
            env["NEARSWAP_MERGEKIT_NO_HOOK"] = "1"
        report = scratch / f"{name}.json"
        command = [
            sys.executable, "-m", "pytest", "-q", "-rfE",
            "-p", "no:cacheprovider",
            "-p", "mergekit_sdist_plugin",
            f"--outcomes-json={report}",
            f"--basetemp={scratch / name}",
            *(f"--ignore={path}" for path in EXCLUDED),
            "tests",
        ]
        start = time.monotonic()
        result = subprocess.run(
            command, cwd=SUITE, env=env, capture_output=True, text=True, timeout=1200
        )
        self.seconds = time.monotonic() - start
        self.name = name
        self.output = result.stdout + result.stderr
        # 0: all passed, 1: some failed; anything else means the run itself broke.
        assert result.returncode in (0, 1) and report.exists(), self.tail()
        data = json.loads(report.read_text())
        self.outcomes = data["outcomes"]
        self.methods = data["methods"] or []

    def tail(self, lines=60):
        return f"{self.name} run:\n" + "\n".join(self.output.splitlines()[-lines:])

    def summary(self):
        counts = Counter(self.outcomes.values())
        return f"{self.name}: " + ", ".join(
            f"{counts[k]} {k}" for k in sorted(counts)
        ) + f" in {self.seconds:.0f}s"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("mergekit-upstream")
    without = Run("no-plugin", hook=False, scratch=scratch)
    live = Run("plugin", hook=True, scratch=scratch)
    line = f"mergekit {MERGEKIT_VERSION} own tests: {without.summary()}; {live.summary()}"
    print("\n" + line)
    return without, live, line


def test_hook_switch_reaches_the_runs(runs):
    without, live, line = runs
    assert METHOD not in without.methods, line
    assert METHOD in live.methods, line


def test_same_outcomes_with_the_plugin(runs):
    without, live, line = runs
    differences = [
        f"{test_id}: {outcome} without the plugin, {live.outcomes.get(test_id, 'absent')} with it"
        for test_id, outcome in sorted(without.outcomes.items())
        if live.outcomes.get(test_id) != outcome
    ]
    assert not differences, f"{line}\n" + "\n".join(differences) + "\n" + live.tail()


def test_plugin_run_has_no_failures(runs):
    _, live, line = runs
    bad = sorted(i for i, o in live.outcomes.items() if o in ("failed", "error", "xpassed"))
    assert not bad, f"{line}\n" + "\n".join(bad) + "\n" + live.tail()


def test_tests_new_with_the_plugin_pass(runs):
    without, live, line = runs
    new = {i: o for i, o in live.outcomes.items() if i not in without.outcomes}
    assert all(o == "passed" for o in new.values()), f"{line}\n{new}"


def generic_tests(run):
    """Tests whose parameter ids include every method registered in `run`."""
    params = defaultdict(set)
    for test_id in run.outcomes:
        if test_id.endswith("]") and "[" in test_id:
            function, _, param = test_id[:-1].partition("[")
            params[function].add(param)
    return sorted(f for f, ids in params.items() if set(run.methods) <= ids)


@pytest.mark.skipif(not ON_MERGEKIT_015, reason="mergekit 0.1.4's suite has no such tests")
def test_generic_tests_run_nearswap_chain(runs):
    without, live, line = runs
    generic = generic_tests(without)
    # On 0.1.5: test_merge_method_regressions.py::
    # test_state_dict_methods_accept_strided_weights_without_mutation
    assert generic, f"no test is parametrised over every registered method\n{line}"
    outcomes = {f"{f}[{METHOD}]": live.outcomes.get(f"{f}[{METHOD}]", "absent") for f in generic}
    print(f"{METHOD} in mergekit's generic tests: {outcomes}")
    assert all(o == "passed" for o in outcomes.values()), f"{line}\n{outcomes}"
