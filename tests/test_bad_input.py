"""What a user hits, through the stock mergekit-yaml: each bad input fails with a
message that names the problem (and the model and tensor where there is one) and
leaves the inputs byte-identical; the odd-but-valid inputs merge as documented."""

import json
import shutil

import pytest
import torch
from conftest import ON_MERGEKIT_015, file_digests, run_cli
from safetensors.torch import load_file, save_file

from nearswap_mergekit.tiny import QUARTET, TinyLlama, build_family

XWIN = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def variants(workspace):
    """Broken and odd copies of the stand-ins, beside them in tiny-quartet/."""
    models = workspace.models
    if (models / "stray-tensor").exists():
        return workspace

    def copy(name, source="xwin"):
        shutil.copytree(models / source, models / name)
        return models / name / "model.safetensors"

    data = (models / "xwin" / "model.safetensors").read_bytes()
    copy("truncated").write_bytes(data[: len(data) // 2])
    tensors = load_file(str(models / "xwin" / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != XWIN}, str(copy("missing-tensor")))
    save_file({**tensors, "extra.weight": torch.ones(3)}, str(copy("stray-tensor")))
    nonfinite = dict(tensors)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], dtype=torch.float16)
    nonfinite[XWIN] = tensors[XWIN].clone()
    nonfinite[XWIN].view(-1)[:400] = special.repeat(100)
    save_file(nonfinite, str(copy("nonfinite")))
    build_family(workspace.root / "deeper", ["base", "deeper"], TinyLlama(num_hidden_layers=3))
    shutil.copytree(workspace.root / "deeper" / "deeper", models / "deeper")
    build_family(workspace.root / "bf16", QUARTET, TinyLlama(dtype=torch.bfloat16))
    for name in QUARTET[1:]:
        shutil.copytree(workspace.root / "bf16" / name, models / f"{name}-bf16")
    return workspace


def recipe(workspace, secondaries, t="0.0001", base="miqu", extra=""):
    models = "".join(f"  - model: {workspace.model(s)}\n" for s in secondaries)
    return (
        f"merge_method: nearswap_chain\nbase_model: {workspace.model(base)}\n"
        f"models:\n{models}parameters:\n  t: {t}\n{extra}"
    )


def merge(workspace, name, text, check):
    workspace.write_recipe(name, text)
    return workspace.merge(name, f"out-{name}", check=check)


FAILURES = {  # case: secondaries, t, what the message says (alternatives: mergekit 0.1.5, 0.1.4)
    "t infinite": (["xwin"], ".inf", "must be a finite number >= 0; got inf"),
    "t a string": (["xwin"], "abc", ("t must be a number; got 'abc'", "parameters.t")),
    "gradient with a negative point": (["xwin"], "[0.001, -0.001]", "must be a finite number >= 0; got -0.001"),
    # safetensors' own words, raised in mergekit's loader (it does not name the file)
    "truncated safetensors": (
        ["truncated"], "0.0001", ("file not fully covered", "MetadataIncompleteBuffer")),
    "secondary missing a tensor": (["missing-tensor"], "0.0001", f"{XWIN} required but not present in model ./tiny-quartet/missing-tensor"),
    "secondary with an extra layer": (["deeper"], "0.0001", "same number of layers"),
    "base does not exist": (["xwin"], "0.0001", "./tiny-quartet/nonexistent"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_failures_name_the_problem_and_leave_inputs_untouched(variants, case):
    secondaries, t, message = FAILURES[case]
    base = "nonexistent" if case == "base does not exist" else "miqu"
    before = file_digests(variants.models)
    name = f"fail-{case.replace(' ', '-')}.yml"
    result = merge(variants, name, recipe(variants, secondaries, t, base), check=False)
    assert result.returncode != 0
    messages = message if isinstance(message, tuple) else (message,)
    assert any(m in result.stdout + result.stderr for m in messages), result.stderr[-3000:]
    assert file_digests(variants.models) == before
    out = variants.root / f"out-{name}"
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_a_bad_t_is_traced_to_where_it_was_set(variants):
    """A bad global t is not blamed on one model; a bad per-model t names its model."""
    global_text = recipe(variants, ["wintergoddess", "xwin"], t="-0.0001")
    global_result = merge(variants, "bad-global-t.yml", global_text, check=False)
    per_model_text = recipe(variants, ["wintergoddess", "xwin"]).replace(
        "  - model: ./tiny-quartet/xwin\n",
        "  - model: ./tiny-quartet/xwin\n    parameters:\n      t: -0.0002\n",
    )
    per_model_result = merge(variants, "bad-model-t.yml", per_model_text, check=False)
    assert global_result.returncode and per_model_result.returncode
    if ON_MERGEKIT_015:  # mergekit says which settings the value came from
        assert "set in the global `parameters:`" in global_result.stderr, global_result.stderr[-2000:]
        assert "got -0.0002 (for model ./tiny-quartet/xwin, tensor" in per_model_result.stderr
        assert "set in the `parameters:` of model ./tiny-quartet/xwin" in per_model_result.stderr
    else:  # mergekit 0.1.4 hands over the value alone: both places are named
        for result in (global_result, per_model_result):
            assert "it comes from the global `parameters:` or from that model's own" in result.stderr


def test_the_same_secondary_twice(variants):
    if not ON_MERGEKIT_015:
        pytest.skip("mergekit 0.1.4 merges repeated models into one before any method sees them")
    result = merge(variants, "twice.yml", recipe(variants, ["xwin", "xwin"]), check=False)
    assert result.returncode != 0
    assert "model ./tiny-quartet/xwin is listed more than once under models" in result.stderr


def test_base_listed_among_models_too_is_the_base_not_a_stage(variants):
    merge(variants, "listed.yml", recipe(variants, ["miqu", "wintergoddess", "xwin"]), check=True)
    variants.assert_merged("out-listed.yml", variants.reference(["wintergoddess", "xwin"], 1e-4))


def test_a_stray_extra_tensor_in_a_secondary_is_ignored(variants):
    merge(variants, "stray.yml", recipe(variants, ["stray-tensor"]), check=True)
    variants.assert_merged("out-stray.yml", variants.reference(["xwin"], 1e-4))


def test_mixed_dtypes_compute_and_round_in_the_promoted_dtype(variants):
    secondaries = ["wintergoddess-bf16", "xwin-bf16"]
    merge(variants, "mixed.yml", recipe(variants, secondaries, t="0.001"), check=True)
    merged = variants.assert_merged("out-mixed.yml", variants.reference(secondaries, 1e-3))
    assert {t.dtype for t in merged.values()} == {torch.float32}  # float16 + bfloat16


def test_nan_and_inf_in_the_weights_follow_the_formula_and_stats_counts_them(variants):
    text = recipe(variants, ["nonfinite"], extra="dtype: float16\n")
    merge(variants, "nonfinite.yml", text, check=True)
    merged = variants.assert_merged("out-nonfinite.yml", variants.reference(["nonfinite"], 1e-4))
    assert merged[XWIN].view(-1)[:400].isnan().any()
    run_cli("nearswap-mergekit", "stats", "nonfinite.yml", "--quiet", "--json", "nonfinite.json",
            cwd=variants.root, check=True)
    (stage,) = json.loads((variants.root / "nonfinite.json").read_text())["results"][0]["stages"]
    assert stage["nonfinite_fraction"] * stage["elements"] == 300  # NaN, +inf, -inf x 100
    (tensor,) = [t for t in stage["tensors"] if t["name"] == XWIN]
    assert tensor["nonfinite_fraction"] * tensor["elements"] == 300
