"""The CLI's start-up (no torch where nothing is computed), --version, the
--target-swap parser, and the recipe writer behind `calibrate -o`."""

import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml
from conftest import CONFIGS, mergekit_independent, run_cli

import nearswap_mergekit
from nearswap_mergekit.tools import recipewriter
from nearswap_mergekit.tools.recipewriter import RecipeWriteError
from nearswap_mergekit.method.spec import parse_target_swap

HEAVY = ("torch", "mergekit", "transformers")


def python(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter of this environment (start-up hook live)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@mergekit_independent
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["recipe"], ["recipe", "quartet"]])
def test_commands_that_compute_nothing_import_no_torch(args):
    result = python(
        "import sys\n"
        "from nearswap_mergekit.cli import main\n"
        f"main({args!r}, standalone_mode=False)  # raises where a command fails\n"
        f"print('heavy:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "heavy: []", result.stdout
    if args == ["recipe", "quartet"]:
        assert "merge_method: nearswap_chain" in result.stdout


@mergekit_independent
def test_version_is_the_one_defined_in_the_package(tmp_path):
    result = run_cli("nearswap-mergekit", "--version", cwd=tmp_path, check=True)
    assert result.stdout == f"nearswap-mergekit, version {nearswap_mergekit.__version__}\n"
    # The build reads the same attribute (hatch's version source): one definition.
    assert version("nearswap-mergekit") == nearswap_mergekit.__version__


@mergekit_independent
def test_public_names_load_on_first_use():
    result = python(
        "import sys\n"
        "import nearswap_mergekit\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "from nearswap_mergekit import (METHOD_NAME, REFERENCE_URL, check_threshold, nearswap,\n"
        "                               nearswap_chain, register)\n"
        "import torch\n"
        "a, b = torch.zeros(3), torch.tensor([1e-5, 1.0, -1.0])\n"
        "print(torch.equal(nearswap_chain(a, [b], 1e-4), nearswap(a, b, 1e-4)), METHOD_NAME,\n"
        "      check_threshold(1), callable(register), REFERENCE_URL.startswith('https://'))\n"
        "print(set(nearswap_mergekit.__all__) <= set(dir(nearswap_mergekit)))\n"
        "from nearswap_mergekit import plan  # a subpackage, not one of the lazy names\n"
        "print(plan.__name__)\n"
        "try:\n"
        "    nearswap_mergekit.no_such_name\n"
        "except AttributeError as error:\n"
        "    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "[]",
        "True nearswap_chain 1.0 True True",
        "True",
        "nearswap_mergekit.plan",
        "module 'nearswap_mergekit' has no attribute 'no_such_name'",
    ]


@mergekit_independent
@pytest.mark.parametrize(
    "text, fraction",
    [("0.8%", 0.008), ("0.008", 0.008), ("0.7%", 0.007), (" 1e-3 ", 0.001), ("50%", 0.5),
     ("99.5 %", 0.995), ("0.49", 0.49)],
)
def test_target_swap_as_fraction_or_percentage(text, fraction):
    warnings = []
    assert parse_target_swap(text, warnings.append) == fraction
    assert warnings == []


@mergekit_independent
@pytest.mark.parametrize("text", ["0.5", "0.8", "0.999"])
def test_bare_target_of_one_half_or_more_warns_once(text):
    warnings = []
    assert parse_target_swap(text, warnings.append) == float(text)
    assert len(warnings) == 1 and f"write {text}%" in warnings[0] and "fraction" in warnings[0]


@mergekit_independent
@pytest.mark.parametrize("text", ["0", "1", "1.5", "-0.1", "0%", "100%", "-1%", "nan", "inf%", "abc", "%", ""])
def test_target_swap_outside_zero_to_one_is_refused(text):
    with pytest.raises(ValueError, match=r"in \(0, 1\).*0\.8%"):
        parse_target_swap(text)


@mergekit_independent
@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-swap", "150%"], "Invalid value for '--target-swap': must be a fraction in (0, 1)"),
        (["--target-swap", "0"], "Invalid value for '--target-swap': must be a fraction in (0, 1)"),
        (["--target-swap", "1%", "--global"], "--global says what -o writes"),
    ],
)
def test_calibrate_usage_errors_exit_2_and_write_nothing(tmp_path, args, message):
    (tmp_path / "r.yml").write_text((CONFIGS / "demo-quartet.yml").read_text())
    result = run_cli("nearswap-mergekit", "calibrate", "r.yml", *args, "--json", "r.json",
                     cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


def test_calibrate_warns_once_on_a_bare_target_of_one_half_or_more(workspace):
    (workspace.root / "warn.yml").write_text((CONFIGS / "demo-boreangale.yml").read_text())
    bare = run_cli("nearswap-mergekit", "calibrate", "warn.yml", "--target-swap", "0.6", "--quiet",
                   "--sample", "0.1", cwd=workspace.root, check=True)
    warnings = [line for line in bare.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --target-swap 0.6 reads as a fraction (0.6 = 60 % of the weights "
                        "fully swapped per pass); for 0.6 percent write 0.6%"]
    assert "target: 60.000% fully swapped per pass" in bare.stdout
    percent = run_cli("nearswap-mergekit", "calibrate", "warn.yml", "--target-swap", "0.6%",
                      "--quiet", "--sample", "0.1", cwd=workspace.root, check=True)
    assert "warning:" not in percent.stderr
    assert "target: 0.600% fully swapped per pass" in percent.stdout


# The recipe writer behind `calibrate -o` (and any command that writes recipes with new t).

FILTERED = {
    "merge_method": "nearswap_chain",
    "base_model": "./m/base",
    "models": [
        {"model": "./m/base"},
        {"model": "./m/a", "parameters": {"t": [{"filter": "mlp", "value": 2e-3}, {"value": 1e-4}]}},
        {"model": "./m/b", "parameters": {"t": [1e-4, 1e-2], "note": 1}},
        {"model": "./m/c"},
    ],
    "parameters": {"t": 1e-4, "round_stages": False},
    "dtype": "float16",
    "tokenizer": {"source": "base"},
}
SLICED = {
    "merge_method": "nearswap_chain",
    "base_model": "./m/base",
    "slices": [{
        "sources": [
            {"model": "./m/base", "layer_range": [0, 2]},
            {"model": "./m/a", "layer_range": [0, 2], "parameters": {"t": [1e-4, 1e-3]}},
            {"model": "./m/b", "layer_range": [0, 2]},
        ],
        "parameters": {"t": 2e-4},
    }],
    "parameters": {"t": 1e-4},
    "dtype": "bfloat16",
}


def write_source(tmp_path, recipe, name="source.yml"):
    path = tmp_path / name
    path.write_text("# the source's own comment\n" + yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def test_per_model_t_replaces_filters_and_gradients_and_keeps_the_rest(tmp_path):
    source = write_source(tmp_path, FILTERED)
    out = str(tmp_path / "out.yml")
    ts = {"./m/a": 0.00031, "./m/b": 0.0007, "./m/c": 1.5e-05}
    text = recipewriter.write_recipe(source, out, per_model_t=ts, header="what it is\nhow it was made")
    assert (tmp_path / "out.yml").read_text() == text
    assert text.startswith(f"# what it is\n# how it was made\n# Merge it: mergekit-yaml {out} OUT/\n")
    written = yaml.safe_load(text)
    expected = {
        **FILTERED,
        "models": [
            {"model": "./m/base"},
            {"model": "./m/a", "parameters": {"t": 0.00031}},
            {"model": "./m/b", "parameters": {"t": 0.0007, "note": 1}},
            {"model": "./m/c", "parameters": {"t": 1.5e-05}},
        ],
        # Every secondary has its own t: the global one would be unused.
        "parameters": {"round_stages": False},
    }
    assert written == expected
    assert list(written) == list(FILTERED)  # the keys keep their order


def test_a_secondary_without_its_own_t_keeps_the_global_t(tmp_path):
    source = write_source(tmp_path, FILTERED)
    text = recipewriter.build_recipe(source, str(tmp_path / "out.yml"), per_model_t={"./m/a": 3e-4})
    written = yaml.safe_load(text.split("\n", 1)[1])
    assert written["parameters"] == {"t": 1e-4, "round_stages": False}
    assert written["models"][1] == {"model": "./m/a", "parameters": {"t": 3e-4}}
    assert not (tmp_path / "out.yml").exists()  # build_recipe writes nothing


def test_global_t_is_set_once_and_removed_everywhere_else(tmp_path):
    for recipe, name in ((FILTERED, "models.yml"), (SLICED, "slices.yml")):
        source = write_source(tmp_path, recipe, name)
        text = recipewriter.write_recipe(source, str(tmp_path / ("out-" + name)), global_t=0.0005)
        written = yaml.safe_load(text)
        if recipe is FILTERED:
            assert written["models"] == [
                {"model": "./m/base"}, {"model": "./m/a"},
                {"model": "./m/b", "parameters": {"note": 1}}, {"model": "./m/c"},
            ]
            assert written["parameters"] == {"t": 0.0005, "round_stages": False}
        else:
            assert written["slices"] == [{"sources": [
                {"model": "./m/base", "layer_range": [0, 2]},
                {"model": "./m/a", "layer_range": [0, 2]},
                {"model": "./m/b", "layer_range": [0, 2]},
            ]}]
            assert written["parameters"] == {"t": 0.0005}
            assert "layer_range: [0, 2]" in text  # numbers on one line, as mergekit writes them
        assert {k: v for k, v in written.items() if k not in ("models", "slices", "parameters")} == {
            k: v for k, v in recipe.items() if k not in ("models", "slices", "parameters")}


def test_slices_get_per_source_t(tmp_path):
    source = write_source(tmp_path, SLICED)
    text = recipewriter.build_recipe(source, str(tmp_path / "o.yml"), per_model_t={"./m/a": 2e-3, "./m/b": 3e-3})
    written = yaml.safe_load(text)
    assert written["slices"] == [{"sources": [
        {"model": "./m/base", "layer_range": [0, 2]},
        {"model": "./m/a", "layer_range": [0, 2], "parameters": {"t": 2e-3}},
        {"model": "./m/b", "layer_range": [0, 2], "parameters": {"t": 3e-3}},
    ]}]
    assert "parameters" not in written


@pytest.mark.parametrize(
    "recipe, per_model_t, out, message",
    [
        ({"merge_method": "nearswap_chain", "modules": {"text": {"models": [{"model": "a"}]}}},
         {"a": 1e-4}, "o.yml", "uses `modules:`"),
        ({"merge_method": "nearswap_chain", "slices": [{"layers": 2}]}, {"a": 1e-4}, "o.yml",
         "slice 1 has no `sources:` list"),
        (FILTERED, {"./m/elsewhere": 1e-4}, "o.yml", "no model './m/elsewhere' to set t on"),
        (FILTERED, {"./m/a": 1e-4}, "source.yml", "is the source recipe"),
        ("- just\n- a list\n", {"a": 1e-4}, "o.yml", "not a mergekit recipe"),
        (FILTERED, {"./m/a": 1e-4}, "no-such-folder/o.yml", "its folder does not exist"),
    ],
)
def test_recipes_that_cannot_be_rewritten_are_refused_and_nothing_is_written(
        tmp_path, recipe, per_model_t, out, message):
    if isinstance(recipe, str):
        (tmp_path / "source.yml").write_text(recipe)
        source = str(tmp_path / "source.yml")
    else:
        source = write_source(tmp_path, recipe)
    before = (tmp_path / "source.yml").read_text()
    with pytest.raises(RecipeWriteError, match=message):
        recipewriter.write_recipe(source, str(tmp_path / out), per_model_t=per_model_t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.yml"]
    assert (tmp_path / "source.yml").read_text() == before


def test_give_either_per_model_or_global_t():
    with pytest.raises(ValueError, match="either"):
        recipewriter.with_thresholds(FILTERED, per_model_t={"./m/a": 1e-4}, global_t=1e-4)
    with pytest.raises(ValueError, match="either"):
        recipewriter.with_thresholds(FILTERED)
