"""The stock mergekit-yaml and mergekit-multi, in a subprocess, on tiny checkpoints."""

import shutil

import pytest
import torch
from conftest import CONFIGS, file_digests, run_cli
from reference import same_bits

SECONDARIES = ["wintergoddess", "aurora-nights", "xwin"]
LAYER_COUNT = 2


def recipe(workspace, secondaries, t=1e-4, **extra):
    models = []
    for name in secondaries:
        entry = {"model": workspace.model(name)}
        if isinstance(t, dict):
            entry["parameters"] = {"t": t[name]}
        models.append(entry)
    result = {
        "merge_method": "nearswap_chain",
        "base_model": workspace.model("miqu"),
        "models": models,
        "dtype": "float16",
    }
    if not isinstance(t, dict):
        result["parameters"] = {"t": t}
    result.update(extra)
    return result


LARGE_T_WARNING = "is >= 0.0025, where the QuartetAnemoi card saw about 18 % of weights"


def test_demo_recipe_equals_the_reference_chain_bitwise(workspace):
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root)
    result = workspace.merge("demo-quartet.yml", "demo-out")
    assert LARGE_T_WARNING not in result.stderr
    merged = workspace.assert_merged("demo-out", workspace.reference(SECONDARIES, 1e-4))
    base = workspace.load("miqu")
    assert all(merged[n].dtype == torch.float16 for n in merged)
    assert any(not torch.equal(merged[n], base[n]) for n in merged)
    card = (workspace.root / "demo-out" / "README.md").read_text()
    assert "NearSwap chain" in card and "QuartetAnemoi-70B-t0.0001" in card


def test_swapping_two_secondaries_changes_the_output_as_the_reference_says(workspace):
    order = ["aurora-nights", "wintergoddess", "xwin"]
    workspace.write_recipe("swapped.yml", recipe(workspace, order, t=1e-3))
    workspace.merge("swapped.yml", "swapped-out")
    swapped = workspace.assert_merged("swapped-out", workspace.reference(order, 1e-3))
    original = workspace.reference(SECONDARIES, 1e-3)
    assert any(not same_bits(swapped[n], original[n]) for n in swapped)


def test_per_model_t(workspace):
    ts = {"wintergoddess": 1e-3, "aurora-nights": 1e-4, "xwin": 5e-3}
    workspace.write_recipe("per-model.yml", recipe(workspace, SECONDARIES, t=ts))
    result = workspace.merge("per-model.yml", "per-model-out")
    workspace.assert_merged("per-model-out", workspace.reference(SECONDARIES, lambda n, m: ts[m]))
    # xwin's t = 0.005: one warning for the whole merge, naming the largest t
    assert result.stderr.count(LARGE_T_WARNING) == 1, result.stderr
    assert "t = 0.005 (tensor " in result.stderr or "t = 0.005 is" in result.stderr
    # stats reports t itself, and does not warn
    stats = run_cli("nearswap-mergekit", "stats", "per-model.yml", "--quiet", cwd=workspace.root, check=True)
    assert LARGE_T_WARNING not in stats.stderr + stats.stdout


def test_mergekit_multi_warns_once_about_a_large_t(workspace):
    stages = [
        {**recipe(workspace, ["wintergoddess"], t=0.003), "name": "large-stage1"},
        {**recipe(workspace, ["xwin"], t=0.004), "base_model": "large-stage1"},
    ]
    path = workspace.root / "large-multi.yml"
    import yaml

    path.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    result = run_cli("mergekit-multi", path.name, "-I", workspace.root / "large-stages",
                     "--out-path", "large-multi-out", cwd=workspace.root, check=True)
    assert result.stderr.count(LARGE_T_WARNING) == 1, result.stderr


def test_layer_gradient_and_filters_of_t(workspace):
    t = [
        {"filter": "mlp", "value": 2e-3},
        {"value": [1e-4, 1e-2]},  # layer 0 -> 1e-4, layer 1 -> 1e-2; others at 0 -> 1e-4
    ]

    def t_for(name, model):
        if "mlp" in name:
            return 2e-3
        return 1e-2 if name.startswith("model.layers.1.") else 1e-4

    assert LAYER_COUNT == 2
    workspace.write_recipe("gradient.yml", recipe(workspace, SECONDARIES, t=t))
    workspace.merge("gradient.yml", "gradient-out")
    workspace.assert_merged("gradient-out", workspace.reference(SECONDARIES, t_for))


def test_round_stages_false_carries_float32_between_stages(workspace):
    workspace.write_recipe(
        "carried.yml",
        recipe(workspace, SECONDARIES, t=1e-3) | {"parameters": {"t": 1e-3, "round_stages": False}},
    )
    workspace.merge("carried.yml", "carried-out")
    workspace.assert_merged("carried-out", workspace.reference(SECONDARIES, 1e-3, round_stages=False))


def test_one_pass_equals_three_stock_mergekit_multi_stages(workspace):
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "one-pass.yml")
    shutil.copy(CONFIGS / "demo-quartet-multistage.yml", workspace.root)
    workspace.merge("one-pass.yml", "one-pass-out")
    run_cli(
        "mergekit-multi",
        "demo-quartet-multistage.yml",
        "-I",
        workspace.root / "stages",
        "--out-path",
        "staged-out",
        cwd=workspace.root,
        check=True,
    )
    workspace.assert_merged("staged-out", workspace.load("one-pass-out"))


def test_repeated_runs_thread_counts_and_kernels_give_the_same_bits(workspace):
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "determinism.yml")
    runs = {
        "first": None,
        "again": None,
        "one thread": {"OMP_NUM_THREADS": "1"},
        "torch kernel": {"NEARSWAP_MERGEKIT_KERNEL": "torch"},
    }
    outputs = {}
    for name, env in runs.items():
        out = f"determinism-{name.replace(' ', '-')}"
        workspace.merge("determinism.yml", out, env=env)
        outputs[name] = out
    first = workspace.load(outputs.pop("first"))
    for out in outputs.values():
        workspace.assert_merged(out, first)


def test_merged_model_loads_in_transformers_and_runs(workspace):
    transformers = pytest.importorskip("transformers")
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "for-hf.yml")
    workspace.merge("for-hf.yml", "hf-out")
    path = str(workspace.root / "hf-out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inputs = tokenizer("the four winds told a story", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == len(tokenizer)
    assert torch.isfinite(logits).all()


def bad_recipe(workspace, case):
    """A two-secondary recipe broken in one way."""
    base = f"base_model: {workspace.model('miqu')}\n"
    models = (
        "models:\n"
        f"  - model: {workspace.model('wintergoddess')}\n"
        f"  - model: {workspace.model('xwin')}\n"
    )
    t = "parameters: {t: 0.0001}\n"
    head = "merge_method: nearswap_chain\n"
    return {
        "negative t": head + base + models + "parameters: {t: -0.0001}\n",
        "NaN t": head + base + models + "parameters: {t: .nan}\n",
        "t given per model, negative": head
        + base
        + models
        + "    parameters: {t: -1.0}\n"  # under xwin, the last model
        + t,
        "no t": head + base + models,
        "no base": head + models + t,
        "no secondaries": head + base + f"models:\n  - model: {workspace.model('miqu')}\n" + t,
        "shapes differ": head + base + models.replace("xwin", "wide") + t,
    }[case]


@pytest.mark.parametrize(
    "case, message",
    [
        ("negative t", "t must be a finite number >= 0; got -0.0001"),
        ("NaN t", "t must be a finite number >= 0; got nan"),
        ("t given per model, negative", "got -1.0 (for model ./tiny-quartet/xwin"),
        ("no t", "Missing required parameter t"),
        ("no base", ("requires a base input", "requires a base model")),  # 0.1.5, 0.1.4
        ("no secondaries", ("requires at least 1 non-base inputs", "requires at least one secondary")),
        ("shapes differ", "Tensor size mismatch"),
    ],
)
def test_bad_input_fails_with_a_message_and_leaves_inputs_untouched(workspace, case, message):
    if case == "shapes differ":
        from nearswap_mergekit.tiny import TinyLlama, build_family

        if not (workspace.models / "wide").exists():
            build_family(workspace.root / "wide-family", ["miqu", "wide"], TinyLlama(hidden_size=96))
            shutil.copytree(workspace.root / "wide-family" / "wide", workspace.models / "wide")
    before = file_digests(workspace.models)
    name = f"bad-{case.replace(' ', '-').replace(',', '')}.yml"
    workspace.write_recipe(name, bad_recipe(workspace, case))
    result = workspace.merge(name, f"out-{name}", check=False)
    assert result.returncode != 0
    messages = message if isinstance(message, tuple) else (message,)
    assert any(m in result.stdout + result.stderr for m in messages), result.stderr[-2000:]
    assert file_digests(workspace.models) == before
