"""pytest plugin for running mergekit's own tests from its sdist (``-p mergekit_sdist_plugin``).

It stands in for ``tests/common.py``, which only mergekit's repository has, imports
mergekit's merge-method registry up front, and writes every test's outcome, plus the
merge methods registered at the end, to the JSON file named by ``--outcomes-json``.
"""

import json
import sys
import types

import pytest

_outcomes = {}


class _MissingHelpers(types.ModuleType):
    """Every attribute is a helper that skips the test calling it."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def helper(*args, **kwargs):
            pytest.skip(f"needs tests/common.py:{name}, which only mergekit's repository has")

        helper.__name__ = name
        return helper


def pytest_addoption(parser):
    parser.addoption("--outcomes-json", help="write {node id: outcome} and the methods here")


def pytest_configure(config):
    # The suite imports its siblings as `tests.X` (test_vocabulary_axis takes
    # make_tokenizer from tests.test_tokenizer). Pin `tests` to this folder: another
    # `tests` on sys.path (an editable checkout's, say) must not join it.
    tests_dir = config.rootpath / "tests"
    package = types.ModuleType("tests")
    package.__path__ = [str(tests_dir)]
    sys.modules["tests"] = package
    if not (tests_dir / "common.py").exists():
        package.common = sys.modules["tests.common"] = _MissingHelpers("tests.common")
    # The hook loads plugins when mergekit.merge_methods is first imported. Some
    # suites (0.1.4's, without the excluded files) never import it; importing it here,
    # in both runs, has a live plugin loaded for every test.
    import mergekit.merge_methods  # noqa: F401


def pytest_collectreport(report):
    if report.failed:
        _outcomes[report.nodeid] = "error"


def pytest_runtest_logreport(report):
    if report.passed and report.when != "call":
        return  # a passing setup or teardown says nothing about the test
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.failed and report.when != "call":
        outcome = "error"
    else:
        outcome = report.outcome
    _outcomes[report.nodeid] = outcome


def _registered_methods():
    registry = sys.modules.get("mergekit.merge_methods.registry")
    if registry is None:
        return None
    if hasattr(registry, "registered_methods"):  # mergekit 0.1.5
        return sorted(m.spec.name for m in registry.registered_methods())
    return sorted(registry.REGISTERED_MERGE_METHODS)  # mergekit 0.1.4


def pytest_sessionfinish(session):
    path = session.config.getoption("outcomes_json")
    if path:
        with open(path, "w") as file:
            json.dump({"outcomes": _outcomes, "methods": _registered_methods()}, file, indent=1)
