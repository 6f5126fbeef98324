"""Random recipes never end in an unexplained traceback from this package's code."""

import traceback
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import nearswap_mergekit
from nearswap_mergekit.plan.recipe import Plan, RecipeError

PACKAGE = str(Path(nearswap_mergekit.__file__).parent)
EXPLAINED = (ValueError, RecipeError)  # pydantic's ValidationError is a ValueError

scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.booleans(),
    st.none(),
    st.sampled_from(["1e-4", "0.001", "abc", "", "-1", "nan"]),
)
settings_strategy = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.lists(
        st.fixed_dictionaries({"value": st.one_of(scalars, st.lists(scalars, max_size=3))},
                              optional={"filter": st.sampled_from(["mlp", "self_attn", "*", "nope"])}),
        max_size=3,
    ),
)
SECONDARIES = ["wintergoddess", "aurora-nights", "xwin"]
good_t = st.floats(0, 0.01)


def path(name):
    return f"./tiny-quartet/{name}"


# A valid recipe, then up to three random mutations: most examples reach the
# planner and the method's own checks, and some get through them.
MUTATIONS = {
    "global t": lambda r, draw: r.setdefault("parameters", {}).update(t=draw(settings_strategy)),
    "model t": lambda r, draw: r["models"] and r["models"][0].update(parameters={"t": draw(settings_strategy)}),
    "round_stages": lambda r, draw: r.setdefault("parameters", {}).update(round_stages=draw(scalars)),
    "no base": lambda r, draw: r.pop("base_model", None),
    "missing base": lambda r, draw: r.update(base_model=path("missing")),
    "missing secondary": lambda r, draw: r["models"].append({"model": path("missing")}),
    "repeated secondary": lambda r, draw: r["models"] and r["models"].append(dict(r["models"][0])),
    "base listed": lambda r, draw: r["models"].insert(0, {"model": path("miqu")}),
    "no secondaries": lambda r, draw: r.update(models=[]),
    "other method": lambda r, draw: r.update(merge_method=draw(st.sampled_from(["linear", "nearswap", 7]))),
    "odd dtype": lambda r, draw: r.update(dtype=draw(st.sampled_from(["int8", "nope", 3]))),
}


@st.composite
def recipes(draw):
    secondaries = draw(st.lists(st.sampled_from(SECONDARIES), min_size=1, max_size=3, unique=True))
    recipe = {
        "merge_method": "nearswap_chain",
        "base_model": path("miqu"),
        "models": [{"model": path(name)} for name in secondaries],
        "parameters": {"t": draw(good_t)},
    }
    if draw(st.booleans()):
        recipe["models"][-1]["parameters"] = {"t": draw(good_t)}
    if draw(st.booleans()):
        recipe["dtype"] = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    for name in draw(st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=3)):
        MUTATIONS[name](recipe, draw)
    return recipe


def assert_explained(error: BaseException):
    """Failures raised inside this package must be ones it means to raise, with a message."""
    frames = traceback.extract_tb(error.__traceback__)
    if frames and frames[-1].filename.startswith(PACKAGE):
        assert isinstance(error, EXPLAINED), "".join(traceback.format_exception(error))
    assert str(error), "".join(traceback.format_exception(error))


def test_random_recipes_plan_or_fail_with_a_reason(workspace, monkeypatch):
    outcomes, messages = Counter(), []
    monkeypatch.chdir(workspace.root)  # the recipes' ./tiny-quartet/ paths

    @settings(max_examples=80, deadline=None, database=None)
    @given(recipe=recipes())
    def plan_or_explain(recipe):
        path = workspace.root / "fuzz.yml"
        path.write_text(yaml.safe_dump(recipe))
        try:
            jobs = Plan(str(path)).jobs
        except Exception as error:  # noqa: BLE001 - judged below
            outcomes[type(error).__name__] += 1
            messages.append(str(error)[-300:])
            assert_explained(error)
            return
        outcomes["planned"] += 1
        for job in jobs:  # a recipe that plans has valid thresholds for every stage
            assert all(stage.t >= 0 for stage in job.stages)

    plan_or_explain()
    # Not vacuous: some recipes got through planning and some were turned away.
    assert outcomes["planned"] > 0, (outcomes, messages[:15])
    assert sum(outcomes.values()) > outcomes["planned"], outcomes


def test_recipe_error_for_a_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("merge_method: [unclosed\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        Plan(str(path)).config
