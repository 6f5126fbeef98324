"""`nearswap-mergekit stats` and `calibrate` against known fractions and real merges."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import CONFIGS, Workspace, file_digests, run_cli
from safetensors.torch import load_file, save_file

from nearswap_mergekit.tiny import TinyLlama, build_family

T = 1e-3


def stats(workspace, *args, check=True):
    return run_cli("nearswap-mergekit", "stats", *args, "--quiet", cwd=workspace.root, check=check)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """float32 base + one secondary whose deltas are 0, t/2 or 10 t in known counts."""
    ws = Workspace(tmp_path_factory.mktemp("known"))
    build_family(ws.models, ["miqu", "wintergoddess"], TinyLlama(dtype=torch.float32))
    base = load_file(str(ws.models / "miqu" / "model.safetensors"))
    gen = np.random.default_rng(0)
    counts = {"elements": 0, "identical": 0, "full": 0}
    secondary = {}
    for name, tensor in base.items():
        n = tensor.numel()
        kind = gen.choice(3, size=n, p=[0.05, 0.15, 0.80])  # identical, swap, move
        sign = gen.choice([-1.0, 1.0], size=n)
        delta = np.where(kind == 0, 0.0, np.where(kind == 1, T / 2, 10 * T)) * sign
        secondary[name] = (tensor.double() + torch.from_numpy(delta).reshape(tensor.shape)).float()
        counts["elements"] += n
        counts["identical"] += int((kind == 0).sum())
        counts["full"] += int((kind <= 1).sum())
    save_file(secondary, str(ws.models / "wintergoddess" / "model.safetensors"))
    ws.write_recipe(
        "known.yml",
        {
            "merge_method": "nearswap_chain",
            "base_model": ws.model("miqu"),
            "models": [{"model": ws.model("wintergoddess")}],
            "parameters": {"t": T},
            "dtype": "float32",
        },
    )
    return ws, counts


def test_exact_fractions_on_constructed_checkpoints(known):
    ws, counts = known
    stats(ws, "known.yml", "--json", "known.json")
    report = json.loads((ws.root / "known.json").read_text())
    assert report["recipe"] == "known.yml" and report["sample"] == 1.0
    (result,) = report["results"]
    assert result["t"] is None
    (stage,) = result["stages"]
    assert stage["model"] == "./tiny-quartet/wintergoddess" and stage["t"] == T
    assert stage["elements"] == counts["elements"]
    assert stage["identical_fraction"] == counts["identical"] / counts["elements"]
    assert stage["full_swap_fraction"] == counts["full"] / counts["elements"]
    assert stage["identical_fraction_se"] == stage["full_swap_fraction_se"] == 0
    # Swapped weights move by t/2, the others by t; identical ones do not move.
    swapped, others = counts["full"] - counts["identical"], counts["elements"] - counts["full"]
    expected_shift = (swapped * T / 2 + others * T) / (swapped + others)
    assert stage["mean_abs_shift"] == pytest.approx(expected_shift, rel=1e-4)
    assert sum(t["elements"] for t in stage["tensors"]) == counts["elements"]
    assert sum(l["elements"] for l in stage["layers"]) == counts["elements"]
    assert {l["layer"] for l in stage["layers"]} == {0, 1, None}


def test_stats_equal_the_counts_of_a_real_staged_merge(workspace):
    """Each stage's numbers equal those counted on mergekit-multi's own intermediates."""
    shutil.copy(CONFIGS / "demo-quartet-multistage.yml", workspace.root / "stats-staged.yml")
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "stats-one-pass.yml")
    run_cli("mergekit-multi", "stats-staged.yml", "-I", workspace.root / "stats-stages",
            "--out-path", "stats-staged-out", cwd=workspace.root, check=True)
    stats(workspace, "stats-one-pass.yml", "--json", "stats-one-pass.json")
    report = json.loads((workspace.root / "stats-one-pass.json").read_text())
    files = [
        workspace.models / "miqu",
        workspace.root / "stats-stages" / "quartet-stage1",
        workspace.root / "stats-stages" / "quartet-stage2",
        workspace.root / "stats-staged-out",
    ]
    secondaries = ["wintergoddess", "aurora-nights", "xwin"]
    for k, stage in enumerate(report["results"][0]["stages"]):
        v0 = load_file(str(files[k] / "model.safetensors"))
        out = load_file(str(files[k + 1] / "model.safetensors"))
        v1 = load_file(str(workspace.models / secondaries[k] / "model.safetensors"))
        identical = full = moved = elements = 0
        shift = 0.0
        for name in v0:
            a, b, r = (x[name].float().numpy() for x in (v0, v1, out))
            with np.errstate(all="ignore"):
                w = np.clip(np.nan_to_num(np.float32(1e-4) / np.abs(a - b), nan=1, posinf=1), 0, 1)
            elements += a.size
            identical += int((a == b).sum())
            full += int((w == 1).sum())
            changed = r != a
            moved += int(changed.sum())
            shift += float(np.abs(r - a)[changed].astype(np.float64).sum())
        assert stage["elements"] == elements
        assert stage["identical_fraction"] == identical / elements
        assert stage["full_swap_fraction"] == full / elements
        assert stage["moved_fraction"] == moved / elements
        assert stage["mean_abs_shift"] == pytest.approx(shift / moved, rel=1e-9)


def test_sampled_estimates_fall_within_three_standard_errors(workspace):
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "sampled.yml")
    stats(workspace, "sampled.yml", "--t", "0.0003", "--t", "0.003", "--json", "exact.json")
    stats(workspace, "sampled.yml", "--t", "0.0003", "--t", "0.003", "--sample", "0.25",
          "--json", "sampled.json")
    exact = json.loads((workspace.root / "exact.json").read_text())
    sampled = json.loads((workspace.root / "sampled.json").read_text())
    assert sampled["sample"] == 0.25
    for exact_result, sampled_result in zip(exact["results"], sampled["results"]):
        for e, s in zip(exact_result["stages"], sampled_result["stages"]):
            for key in ("identical_fraction", "full_swap_fraction", "mean_abs_shift"):
                assert s[key + "_se"] > 0
                assert abs(s[key] - e[key]) <= 3 * s[key + "_se"], (key, s, e)


def test_ladder_table_and_plot(workspace, tmp_path):
    pytest.importorskip("matplotlib")
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "ladder.yml")
    result = stats(workspace, "ladder.yml", "--t", "0.0001", "--t", "0.001", "--t", "0.01",
                   "--plot", tmp_path / "ladder.png", "--json", tmp_path / "ladder.json")
    assert "% of weights fully swapped per pass" in result.stdout
    assert (tmp_path / "ladder.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads((tmp_path / "ladder.json").read_text())
    assert [r["t"] for r in report["results"]] == [0.0001, 0.001, 0.01]
    means = [np.mean([s["full_swap_fraction"] for s in r["stages"]]) for r in report["results"]]
    assert means == sorted(means) and means[0] < 0.05 < means[-1]


def test_calibrate_suggests_t_that_achieves_the_target(workspace):
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "calibrate.yml")
    run_cli("nearswap-mergekit", "calibrate", "calibrate.yml", "--target-swap", "0.05",
            "--quiet", "--json", "calibrated.json", cwd=workspace.root, check=True)
    result = json.loads((workspace.root / "calibrated.json").read_text())
    assert result["target"] == 0.05 and result["global_t"] > 0
    assert [s["model"] for s in result["stages"]] == [
        "./tiny-quartet/wintergoddess", "./tiny-quartet/aurora-nights", "./tiny-quartet/xwin"]
    for stage in result["stages"]:
        assert abs(stage["achieved_full_swap_fraction"] - 0.05) < 0.005
        assert isinstance(stage["t"], float) and stage["t"] > 0
    assert abs(result["global_achieved_full_swap_fraction"] - 0.05) < 0.005
    # The suggested per-stage t, written into the recipe, gives what calibrate said.
    workspace.write_recipe("calibrated-recipe.yml", {
        "merge_method": "nearswap_chain",
        "base_model": workspace.model("miqu"),
        "models": [{"model": s["model"], "parameters": {"t": s["t"]}} for s in result["stages"]],
        "dtype": "float16",
    })
    stats(workspace, "calibrated-recipe.yml", "--json", "check.json")
    check = json.loads((workspace.root / "check.json").read_text())
    assert [s["full_swap_fraction"] for s in check["results"][0]["stages"]] == [
        s["achieved_full_swap_fraction"] for s in result["stages"]]


def calibrate(workspace, *args):
    return run_cli("nearswap-mergekit", "calibrate", *args, "--quiet", cwd=workspace.root, check=True)


def test_calibrate_writes_recipes_that_merge_with_the_t_it_suggests(workspace, tmp_path):
    """-o writes each stage's t in place of the filters and gradients that set it
    before; -o --global the one t. The stock mergekit-yaml merges each with exactly
    those t, and stats on each reports the fractions calibrate said they achieve."""
    workspace.write_recipe("to-calibrate.yml", {
        "merge_method": "nearswap_chain",
        "base_model": workspace.model("miqu"),
        "models": [
            {"model": workspace.model("wintergoddess"),
             "parameters": {"t": [{"filter": "mlp", "value": 2e-3}, {"value": 1e-4}]}},
            {"model": workspace.model("aurora-nights"), "parameters": {"t": [1e-4, 1e-2]}},
            {"model": workspace.model("xwin")},
        ],
        "parameters": {"t": 1e-4, "round_stages": True},
        "dtype": "float16",
        "tokenizer": {"source": "base"},
    })
    calibrate(workspace, "to-calibrate.yml", "--target-swap", "5%", "--json", "per-stage.json",
              "-o", "per-stage.yml")
    calibrate(workspace, "to-calibrate.yml", "--target-swap", "0.05", "-o", "global.yml", "--global")
    result = json.loads((workspace.root / "per-stage.json").read_text())
    secondaries = [stage["model"].rsplit("/", 1)[-1] for stage in result["stages"]]
    assert secondaries == ["wintergoddess", "aurora-nights", "xwin"]

    text = (workspace.root / "per-stage.yml").read_text()
    header = text[: text.index("\nmerge_method")]
    assert all(line.startswith("# ") for line in header.splitlines())
    assert "to-calibrate.yml" in header and "5%" in header
    assert "nearswap-mergekit calibrate to-calibrate.yml --target-swap 5% -o per-stage.yml" in header
    assert "mergekit-yaml per-stage.yml OUT/" in header
    written = yaml.safe_load(text)
    assert written["models"] == [
        {"model": stage["model"], "parameters": {"t": stage["t"]}} for stage in result["stages"]]
    assert written["parameters"] == {"round_stages": True}
    assert written["tokenizer"] == {"source": "base"} and written["dtype"] == "float16"
    per_stage_t = dict(zip(secondaries, (stage["t"] for stage in result["stages"])))
    workspace.merge("per-stage.yml", "per-stage-out")
    workspace.assert_merged("per-stage-out",
                            workspace.reference(secondaries, lambda _name, model: per_stage_t[model]))
    stats(workspace, "per-stage.yml", "--json", "per-stage-stats.json")
    check = json.loads((workspace.root / "per-stage-stats.json").read_text())
    assert [s["full_swap_fraction"] for s in check["results"][0]["stages"]] == [
        s["achieved_full_swap_fraction"] for s in result["stages"]]

    text = (workspace.root / "global.yml").read_text()
    assert "--target-swap 5% -o global.yml --global" in text
    written = yaml.safe_load(text)
    assert written["models"] == [{"model": workspace.model(name)} for name in secondaries]
    assert written["parameters"] == {"t": result["global_t"], "round_stages": True}
    workspace.merge("global.yml", "global-out")
    workspace.assert_merged("global-out", workspace.reference(secondaries, result["global_t"]))
    stats(workspace, "global.yml", "--json", "global-stats.json")
    check = json.loads((workspace.root / "global-stats.json").read_text())
    assert [s["full_swap_fraction"] for s in check["results"][0]["stages"]] == [
        s["full_swap_fraction_at_global_t"] for s in result["stages"]]


def test_calibrate_refuses_a_recipe_it_cannot_rewrite_before_reading(workspace):
    workspace.write_recipe("sliced.yml", {
        "merge_method": "nearswap_chain",
        "base_model": workspace.model("miqu"),
        "slices": [{"sources": [{"model": workspace.model(name), "layer_range": [0, 2]}
                                for name in ("miqu", "xwin")]}],
        "parameters": {"t": 1e-4},
    })
    result = run_cli("nearswap-mergekit", "calibrate", "sliced.yml", "--target-swap", "5%",
                     "-o", "sliced.yml", cwd=workspace.root)
    assert result.returncode == 2
    assert "'sliced.yml' is the source recipe; write the new recipe to another file" in result.stderr
    assert "reading" not in result.stderr and "target:" not in result.stdout


def test_calibrate_plot(workspace, tmp_path):
    pytest.importorskip("matplotlib")
    shutil.copy(CONFIGS / "demo-boreangale.yml", workspace.root / "plotted.yml")
    result = calibrate(workspace, "plotted.yml", "--target-swap", "5%", "--sample", "0.25",
                       "--plot", tmp_path / "calibrated.png")
    assert f"wrote {tmp_path / 'calibrated.png'}" in result.stdout
    assert (tmp_path / "calibrated.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "args, message, code",  # 2: bad input; 1: a failure while reading the models
    [
        (["missing.yml"], "recipe 'missing.yml' does not exist", 2),
        (["linear.yml"], "uses merge_method 'linear'", 2),
        (["ok.yml", "--t", "-0.001"], "t must be a finite number >= 0", 2),
        (["ok.yml", "--sample", "0"], "must be in (0, 1]", 2),
        (["ok.yml", "--sample", "1.5"], "must be in (0, 1]", 2),
        (["corrupt.yml"], "cannot read the models of corrupt.yml", 1),
    ],
)
def test_bad_input(workspace, args, message, code):
    workspace.write_recipe("ok.yml", (CONFIGS / "demo-boreangale.yml").read_text())
    workspace.write_recipe("linear.yml", {
        "merge_method": "linear",
        "models": [{"model": workspace.model("miqu"), "parameters": {"weight": 1.0}}],
    })
    corrupt = workspace.root / "corrupt-models"
    if not corrupt.exists():
        shutil.copytree(workspace.models / "miqu", corrupt / "miqu")
        shutil.copytree(workspace.models / "xwin", corrupt / "broken")
        data = (corrupt / "broken" / "model.safetensors").read_bytes()
        (corrupt / "broken" / "model.safetensors").write_bytes(data[: len(data) // 2])
    workspace.write_recipe("corrupt.yml", {
        "merge_method": "nearswap_chain",
        "base_model": "./corrupt-models/miqu",
        "models": [{"model": "./corrupt-models/broken"}],
        "parameters": {"t": 1e-4},
    })
    before = file_digests(workspace.models)
    result = stats(workspace, *args, check=False)
    assert result.returncode == code
    assert message in result.stdout + result.stderr, result.stderr
    assert file_digests(workspace.models) == before


def test_several_global_targets_take_two_read_passes(workspace, monkeypatch):
    """`ladder --target-swap` with several targets: the coarse grid of t in one read
    pass, then every target's fine grid together in a second; each target gets the t
    a search of its own finds."""
    from nearswap_mergekit.plan import calibration, planning
    from nearswap_mergekit.plan.recipe import Plan

    # Absolute paths: mergekit caches loaders by path for the life of this process.
    workspace.write_recipe("targets.yml", {
        "merge_method": "nearswap_chain",
        "base_model": str(workspace.models / "miqu"),
        "models": [{"model": str(workspace.models / name)} for name in ("wintergoddess", "aurora-nights", "xwin")],
        "parameters": {"t": 1e-4},
        "dtype": "float16",
    })
    jobs = Plan(str(workspace.root / "targets.yml")).jobs
    passes = []
    measure = calibration.measure
    monkeypatch.setattr(calibration, "measure", lambda *a, **k: passes.append(len(a[1])) or measure(*a, **k))
    targets = [0.008, 0.1, 0.3]
    together = calibration.global_ts_for_targets(jobs, targets, progress=False)
    assert len(passes) == 2
    alone = [calibration.global_ts_for_targets(jobs, [target], progress=False)[0] for target in targets]
    assert together == alone
    assert all(abs(fraction - target) < 0.01 for (_, fraction), target in zip(together, targets))
