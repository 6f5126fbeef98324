"""`nearswap-mergekit check`: the preflight, on shipped recipes and on tiny checkpoints
whose facts are known (a real merge's output size among them)."""

import json
import shutil

import pytest
from conftest import CONFIGS, run_cli
from safetensors.torch import load_file, save_file

RECIPE_NAMES = sorted(p.stem for p in CONFIGS.glob("*.yml"))


def check(*args, cwd, env=None):
    return run_cli("nearswap-mergekit", "check", *args, cwd=cwd, env=env)


def check_here(*args, cwd, monkeypatch):
    """`check` in this process (mergekit is imported already: seconds, not tens)."""
    from click.testing import CliRunner

    from nearswap_mergekit.cli import main

    monkeypatch.chdir(cwd)
    return CliRunner().invoke(main, ["check", *args])


@pytest.mark.parametrize("name", RECIPE_NAMES)
@pytest.mark.parametrize("hub", ["reachable", "offline"])
def test_every_shipped_recipe_checks_without_its_models(name, hub, tmp_path, monkeypatch):
    """With an empty cache, Hub models are 'not checked' where the Hub can be reached
    (mergekit downloads them) and problems where it cannot (mergekit-yaml would
    fail); stage names of mergekit-multi recipes are not taken for models."""
    import huggingface_hub.constants

    from nearswap_mergekit.plan import validation

    # An empty Hugging Face cache, so that no Hub model is found locally.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # Whether the Hub can be reached is this machine's network, not the recipe's.
    monkeypatch.setattr(validation, "hub_unreachable", lambda: None if hub == "reachable" else "offline here")
    shutil.copy(CONFIGS / f"{name}.yml", tmp_path / "recipe.yml")
    result = check_here("recipe.yml", "out", "--out-shard-size", "1B", cwd=tmp_path,
                        monkeypatch=monkeypatch)
    if name.startswith("demo-"):  # its ./tiny-quartet models are not there
        assert result.exit_code == 2 and "no such folder" in result.output, result.output
        return
    assert "quartet-stage" not in result.output
    assert "nearswap_chain is registered with mergekit" in result.output
    if hub == "reachable":
        assert result.exit_code == 0, result.output
        assert "not checked: model 152334H/miqu-1-70b-sf: a Hub model, not in the local" in result.output
    else:
        assert result.exit_code == 2 and "would run" not in result.output, result.output
        assert ("problem: model 152334H/miqu-1-70b-sf: a Hub model, not in the local Hugging Face "
                "cache") in result.output and "the Hub cannot be reached (offline here)" in result.output


def test_a_runnable_recipe_reports_what_the_merge_writes(workspace, tmp_path):
    """The output size `check` predicts is the size of the real merge's tensors."""
    recipe = workspace.root / "check-demo.yml"
    shutil.copy(CONFIGS / "demo-quartet.yml", recipe)
    result = check(recipe.name, "check-out", cwd=workspace.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would run" in result.stdout and "problem" not in result.stdout
    workspace.merge(recipe.name, "check-out")
    merged = load_file(str(workspace.root / "check-out" / "model.safetensors"))
    written = sum(t.numel() * t.element_size() for t in merged.values())
    line = next(l for l in result.stdout.splitlines() if l.startswith("ok: disk:"))
    assert f"({written:,} bytes of tensors)" in line, line
    again = check(recipe.name, "check-out", cwd=workspace.root)
    assert again.returncode == 2 and "check-out is not empty" in again.stdout


def write(folder, name, text):
    (folder / name).write_text(text)
    return name


BASE = "merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {other}\n    parameters:\n      t: {t}\ndtype: float16\n"


def test_problems_are_listed_together_and_exit_2(workspace, monkeypatch):
    root = workspace.root
    local = root / "check-models"
    local.mkdir(exist_ok=True)
    if not (local / "xwin").exists():
        shutil.copytree(workspace.models / "xwin", local / "xwin")
    recipe = write(root, "check-typo.yml", BASE.format(
        method="nearswap_chian", base="./tiny-quartet/miqu", other="check-models/xwin", t=0.0001))
    result = check_here(recipe, cwd=root, monkeypatch=monkeypatch)
    assert result.exit_code == 2, result.stdout
    assert "merge_method 'nearswap_chian' is not a merge method of this mergekit (did you mean 'nearswap_chain'?)" in result.stdout
    assert "write it as './check-models/xwin'" in result.stdout
    missing = write(root, "check-missing.yml", BASE.format(
        method="nearswap_chain", base="./tiny-quartet/miqu", other="./tiny-quartet/nope", t=0.0001))
    result = check_here(missing, cwd=root, monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "model ./tiny-quartet/nope: no such folder" in result.stdout


def test_a_large_t_warns_naming_the_card_but_runs(workspace, monkeypatch):
    recipe = write(workspace.root, "check-large-t.yml", BASE.format(
        method="nearswap_chain", base="./tiny-quartet/miqu", other="./tiny-quartet/xwin", t=0.003))
    result = check_here(recipe, cwd=workspace.root, monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.stdout
    assert "warning: the recipe: t = 0.003 (model ./tiny-quartet/xwin) is >= 0.0025" in result.stdout
    small = write(workspace.root, "check-small-t.yml", BASE.format(
        method="nearswap_chain", base="./tiny-quartet/miqu", other="./tiny-quartet/xwin", t=0.0024))
    assert "warning" not in check_here(small, cwd=workspace.root, monkeypatch=monkeypatch).stdout


def test_differing_vocabularies_need_tokenizer(workspace, monkeypatch):
    root = workspace.root
    padded = root / "check-xwin-padded"
    if not padded.exists():
        shutil.copytree(workspace.models / "xwin", padded)
        tensors = load_file(str(padded / "model.safetensors"))
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors:
                rows = tensors[name]
                tensors[name] = rows.new_zeros((rows.shape[0] + 2, rows.shape[1])).copy_(
                    __import__("torch").cat([rows, rows[:2]]))
        save_file(tensors, str(padded / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((padded / "config.json").read_text())
        config["vocab_size"] += 2
        (padded / "config.json").write_text(json.dumps(config))
    plain = write(root, "check-vocab.yml", BASE.format(
        method="nearswap_chain", base="./tiny-quartet/miqu", other="./check-xwin-padded", t=0.0001))
    result = check_here(plain, cwd=root, monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "vocabularies differ (./tiny-quartet/miqu 320, ./check-xwin-padded 322): add `tokenizer:`" in result.stdout
    aligned = write(root, "check-vocab-aligned.yml", (root / plain).read_text() + "tokenizer:\n  source: base\n")
    result = check_here(aligned, cwd=root, monkeypatch=monkeypatch)
    assert result.exit_code == 0 and "`tokenizer:` aligns them" in result.stdout, result.stdout


def test_an_environment_without_the_plugin_is_named(workspace):
    """With the start-up hook off, mergekit-yaml would not find the method: check says so."""
    recipe = write(workspace.root, "check-plain.yml", BASE.format(
        method="nearswap_chain", base="./tiny-quartet/miqu", other="./tiny-quartet/xwin", t=0.0001))
    result = check(recipe, cwd=workspace.root, env={"NEARSWAP_MERGEKIT_NO_HOOK": "1"})
    assert result.returncode == 2
    assert "nearswap_chain is not registered with mergekit" in result.stdout
    assert "Unimplemented merge method" in result.stdout


def test_bad_arguments_exit_2_naming_them(tmp_path, monkeypatch):
    result = check_here("nope.yml", cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "nope.yml" in result.stderr
    (tmp_path / "r.yml").write_text(BASE.format(method="nearswap_chain", base="./a", other="./b", t=1e-4))
    result = check_here("r.yml", "out", "--out-shard-size", "lots", cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "out-shard-size" in result.stderr
    result = check_here("r.yml", "out", "--no-such-flag", cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "--no-such-flag" in result.stderr
