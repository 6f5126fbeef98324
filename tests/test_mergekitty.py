"""mergekitty, mergekit's LGPL fork, in an environment without mergekit: its stock
mergekitty-yaml runs nearswap_chain to the reference bits, the demo runs on it, and
the commands that need mergekit's own planner say so."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import CONFIGS, Workspace, file_digests, only_mergekitty, run_cli

pytestmark = only_mergekitty

SECONDARIES = ["wintergoddess", "aurora-nights", "xwin"]


def test_stock_mergekitty_yaml_merges_the_demo_quartet_to_the_reference_bits(workspace):
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "kitty-demo.yml")
    run_cli("mergekitty-yaml", "kitty-demo.yml", "kitty-demo-out", cwd=workspace.root, check=True)
    workspace.assert_merged("kitty-demo-out", workspace.reference(SECONDARIES, 1e-4))


def test_mergekittys_own_nearswap_gives_the_same_bits_with_the_plugin_live(workspace):
    """Registering nearswap_chain leaves mergekitty's `nearswap` (one pair) as it was."""
    workspace.write_recipe("kitty-own.yml", {
        "merge_method": "nearswap",
        "base_model": workspace.model("miqu"),
        "models": [{"model": workspace.model("xwin")}],
        "parameters": {"t": 1e-4},
        "dtype": "float16",
    })
    digests = {}
    for hook, env in (("live", {}), ("off", {"NEARSWAP_MERGEKIT_NO_HOOK": "1"})):
        run_cli("mergekitty-yaml", "kitty-own.yml", f"kitty-own-{hook}", cwd=workspace.root,
                env=env, check=True)
        digests[hook] = {path: digest for path, digest in
                         file_digests(workspace.root / f"kitty-own-{hook}").items()
                         if path.suffix == ".safetensors"}
    assert digests["live"] and digests["live"] == digests["off"]
    assert workspace.load("kitty-own-live").keys() == workspace.load("miqu").keys()


def test_demo_runs_on_mergekitty(tmp_path):
    result = run_cli("nearswap-mergekit", "demo", "--workdir", "demo", cwd=tmp_path, check=True)
    assert "mergekitty-yaml" in result.stdout, result.stdout
    demo = Workspace(tmp_path / "demo")
    demo.assert_merged("merged", demo.reference(SECONDARIES, 1e-4))


@pytest.mark.parametrize(
    "command",
    [["stats", "kitty-stats.yml", "--quiet"],
     ["calibrate", "kitty-stats.yml", "--target-swap", "0.05", "--quiet"],
     ["check", "kitty-stats.yml"],
     ["ladder", "kitty-stats.yml", "--text", "kitty-stats.yml", "--quiet"],
     ["compare", "./tiny-quartet/miqu", "./tiny-quartet/xwin", "--quiet"]],
    ids=lambda c: c[0])
def test_commands_built_on_mergekit_ask_for_it(workspace, command):
    """One line naming the fix, exit 2, nothing written."""
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "kitty-stats.yml")
    report = workspace.root / f"kitty-{command[0]}.json"
    json_option = [] if command[0] == "check" else ["--json", report]
    result = run_cli("nearswap-mergekit", *command, *json_option, cwd=workspace.root)
    assert result.returncode == 2, result.stderr
    assert "pip install mergekit==0.1.5" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not report.exists()


def test_start_up_imports_neither_mergekitty_nor_torch():
    """The hook watches mergekitty.merge_methods without importing anything itself."""
    env = {k: v for k, v in os.environ.items() if k != "NEARSWAP_MERGEKIT_NO_HOOK"}
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys; print(sorted({m.split('.')[0] for m in sys.modules}"
         " & {'torch', 'mergekitty', 'nearswap_mergekit'}), 'nearswap_mergekit_hook' in sys.modules)"],
        capture_output=True, text=True, env=env, cwd="/",
    )
    assert result.stdout.split() == ["[]", "True"], result.stderr
