"""A bad recipe meets one validation in every command: `check`, `stats`, `calibrate`
and `ladder` each answer it with one line per problem that names the file and the
parameter or model, exit 2 and write nothing; and `check` refuses every recipe the
stock `mergekit-yaml` refuses."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ON_MERGEKIT_015, mergekit_independent, only_mergekit_015, run_cli

GOOD = """merge_method: nearswap_chain
base_model: ./tiny-quartet/miqu
models:
  - model: ./tiny-quartet/xwin
parameters:
  t: 0.0001
dtype: float32
"""


def with_t(t: str) -> str:
    return GOOD.replace("  t: 0.0001", f"  t: {t}")


#: name -> (recipe text, what the message must name, environment)
BAD = {
    "negative t": (with_t("-0.0001"), "t = -0.0001 in the global `parameters:`", {}),
    "t not a number": (with_t("abc"), "t = 'abc'", {}),
    "t NaN": (with_t(".nan"), "t = nan", {}),
    "t per model": (GOOD.replace("  - model: ./tiny-quartet/xwin",
                                 "  - model: ./tiny-quartet/xwin\n    parameters:\n      t: -1"),
                    "t = -1 in model ./tiny-quartet/xwin", {}),
    "t in a gradient": (with_t("[0.0001, -0.5]"), "gradient point 2", {}),
    "t in a filter": (with_t("\n    - filter: mlp\n      value: .inf\n    - value: 0.0001"),
                      "filter 'mlp'", {}),
    "broken YAML": ("merge_method: [\n", "is not valid YAML", {}),
    "empty file": ("", "is empty", {}),
    "not a mapping": ("- just\n- a list\n", "not a mapping", {}),
    "missing model folder": (GOOD.replace("./tiny-quartet/xwin", "./tiny-quartet/nope"),
                             "./tiny-quartet/nope", {}),
    # The shipped quartet's Hub models with an empty cache, offline.
    "Hub models offline": ("""merge_method: nearswap_chain
base_model: 152334H/miqu-1-70b-sf
models:
  - model: Xwin-LM/Xwin-LM-70B-V0.1
parameters:
  t: 0.0001
""", "152334H/miqu-1-70b-sf", {"HF_HUB_OFFLINE": "1"}),
}
#: The issue's rows (the other t variants go the same way through mergekit-yaml).
TABLE = ("negative t", "t not a number", "t NaN", "broken YAML", "empty file", "missing model folder",
         "Hub models offline")
#: Bad for the commands that plan a NearSwap chain, though mergekit-yaml runs it.
OTHER_METHOD = ("merge_method: linear\nmodels:\n  - model: ./tiny-quartet/miqu\n    parameters:\n"
                "      weight: 1.0\ndtype: float32\n")

COMMANDS = {
    "check": [],
    "stats": ["--quiet"],
    "calibrate": ["--target-swap", "1%", "--quiet"],
    "ladder": ["--text", "text.txt", "--quiet"],
}
NEVER = ("Traceback", "pydantic", "Repo id", "would run")


def commands_for(name: str):
    """Every command for the issue's rows; `check` and `stats` for the other cases,
    which reach the same validation the same way in every planning command. With
    another mergekit, `check` alone: the others share its validation, which runs
    before mergekit reads the recipe, and `check` is the one compared with that
    mergekit's mergekit-yaml."""
    if not ON_MERGEKIT_015:
        return ["check"]
    return list(COMMANDS) if name in TABLE else ["check", "stats"]


@pytest.fixture(scope="module")
def folder(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("first-contact")
    (root / "tiny-quartet").symlink_to(workspace.models)
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 20)
    (root / "hf-home").mkdir()  # an empty Hugging Face cache
    for name, (text, _needle, _env) in BAD.items():
        (root / f"{name.replace(' ', '-')}.yml").write_text(text)
    (root / "good.yml").write_text(GOOD)
    (root / "other-method.yml").write_text(OTHER_METHOD)
    return root


def run(folder, program, *args, env=None):
    return run_cli(program, *args, cwd=folder, env={"HF_HOME": str(folder / "hf-home"), **(env or {})})


def files_in(folder):
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture(scope="module")
def answers(folder):
    """Every command on every bad recipe, run side by side: {(name, command): result}."""
    cases = [(name, command) for name in BAD for command in commands_for(name)]

    def answer(case):
        name, command = case
        recipe = f"{name.replace(' ', '-')}.yml"
        return case, run(folder, "nearswap-mergekit", command, recipe, *COMMANDS[command], env=BAD[name][2])

    before = files_in(folder)
    with ThreadPoolExecutor(4) as pool:
        found = dict(pool.map(answer, cases))
    assert files_in(folder) == before  # nothing written by any of them
    return found


@pytest.mark.parametrize("name", list(BAD))
def test_every_command_answers_in_one_line_naming_the_problem(answers, name):
    _text, needle, _env = BAD[name]
    recipe = f"{name.replace(' ', '-')}.yml"
    for command in commands_for(name):
        result = answers[name, command]
        said = result.stdout + result.stderr
        assert result.returncode == 2, f"{command}: {said}"
        assert needle in said, f"{command}: {said}"
        assert not any(word in said for word in NEVER), f"{command}: {said}"
        if command == "check" and result.stdout.strip():  # the report lists each problem once
            lines = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
        else:
            assert not result.stdout.strip(), f"{command}: {said}"
            lines = result.stderr.strip().splitlines()
            assert lines[0].startswith("Error: recipe "), f"{command}: {said}"
            assert all(recipe in line for line in lines), f"{command}: {said}"
        assert lines, f"{command}: {said}"


@only_mergekit_015  # the validation's own message, before mergekit reads the recipe
def test_another_merge_method_is_named_by_the_planning_commands(folder):
    commands = ("stats", "calibrate", "ladder")
    with ThreadPoolExecutor(len(commands)) as pool:
        results = list(pool.map(lambda c: run(folder, "nearswap-mergekit", c, "other-method.yml", *COMMANDS[c]),
                                commands))
    for result in results:
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "merge_method 'linear'" in result.stderr
        assert "write merge_method: nearswap_chain" in result.stderr


def test_check_refuses_every_recipe_mergekit_yaml_refuses(folder, answers):
    """The stock mergekit-yaml on each bad recipe of the table (and a good one, so
    that the comparison can fail): every recipe it refuses, check refused first."""
    cases = {**{name: (f"{name.replace(' ', '-')}.yml", BAD[name][2]) for name in TABLE},
             "good": ("good.yml", {})}

    def merge(item):
        name, (recipe, env) = item
        return name, run(folder, "mergekit-yaml", recipe, f"out-{name.replace(' ', '-')}", env=env)

    with ThreadPoolExecutor(4) as pool:
        merged = dict(pool.map(merge, cases.items()))
    good = run(folder, "nearswap-mergekit", "check", "good.yml", "out-check-good")
    checked = {**{name: answers[name, "check"] for name in TABLE}, "good": good}
    refused_by_mergekit = {name for name, result in merged.items() if result.returncode != 0}
    refused_by_check = {name for name, result in checked.items() if result.returncode != 0}
    assert refused_by_mergekit == set(TABLE), {name: m.stderr[-300:] for name, m in merged.items()}
    assert refused_by_mergekit <= refused_by_check
    assert good.returncode == 0 and "would run" in good.stdout


@only_mergekit_015  # calibrate's own search and report: the same on every mergekit
def test_calibrate_says_when_a_target_is_reached_already_at_t_0(folder):
    """A target below the share of weights identical in base and secondary gets t = 0,
    and calibrate says so with that share (the one `stats` counts as identical)."""
    measured = run(folder, "nearswap-mergekit", "stats", "good.yml", "--t", "0", "--quiet",
                   "--json", "identical.json")
    assert measured.returncode == 0, measured.stderr
    import json

    (stage,) = json.loads((folder / "identical.json").read_text())["results"][0]["stages"]
    (folder / "identical.json").unlink()
    identical = stage["identical_fraction"]
    assert identical > 0.001
    low = run(folder, "nearswap-mergekit", "calibrate", "good.yml", "--target-swap",
              f"{100 * identical / 2:.4f}%", "--quiet")
    assert low.returncode == 0, low.stderr
    assert "stage 1: t = 0 " in low.stdout
    assert (f"note: stage 1: {100 * identical / 2:.3f}% is reached already at t = 0, where "
            f"{100 * identical:.3f}% of the weights are identical") in low.stdout, low.stdout
    high = run(folder, "nearswap-mergekit", "calibrate", "good.yml", "--target-swap", "10%", "--quiet")
    assert high.returncode == 0 and "reached already" not in high.stdout, high.stdout


@mergekit_independent
def test_the_hub_counts_as_unreachable_offline_or_without_a_connection(monkeypatch):
    """HF_HUB_OFFLINE, or no TCP connection to the endpoint, is unreachable; a port
    that accepts connections is reachable (nothing is asked of it)."""
    import socket

    from huggingface_hub import constants

    from nearswap_mergekit.plan import validation

    def unreachable(offline: bool, endpoint: str):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        validation.hub_unreachable.cache_clear()
        try:
            return validation.hub_unreachable()
        finally:
            validation.hub_unreachable.cache_clear()

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    open_port = listening.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        assert unreachable(True, f"http://127.0.0.1:{open_port}") == "HF_HUB_OFFLINE is set"
        assert unreachable(False, f"http://127.0.0.1:{open_port}") is None
        assert "127.0.0.1 cannot be reached" in unreachable(False, f"http://127.0.0.1:{closed_port}")
    finally:
        listening.close()
