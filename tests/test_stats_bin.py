"""`stats` on pickled (.bin) checkpoints: the same numbers as their safetensors twins,
read one tensor per model at a time."""

import json
import shutil

import pytest
import torch
from conftest import CONFIGS, run_cli
from safetensors.torch import load_file

from nearswap_mergekit.tiny import QUARTET


@pytest.fixture(scope="module")
def bin_twins(workspace):
    """tiny-quartet-bin/: the stand-ins as torch.save state dicts (pytorch_model.bin)."""
    twins = workspace.root / "tiny-quartet-bin"
    if not twins.exists():
        for name in QUARTET:
            source, target = workspace.models / name, twins / name
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
            torch.save(load_file(str(source / "model.safetensors")), target / "pytorch_model.bin")
    text = (CONFIGS / "demo-quartet.yml").read_text()
    workspace.write_recipe("st.yml", text)
    workspace.write_recipe("bin.yml", text.replace("./tiny-quartet/", "./tiny-quartet-bin/"))
    return workspace


def report(ws, recipe, *args):
    json_path = ws.root / f"{recipe}.{'-'.join(args) or 'exact'}.json"
    run_cli("nearswap-mergekit", "stats", recipe, "--quiet", "--json", json_path, *args,
            cwd=ws.root, check=True)
    return json.loads(json_path.read_text())


def stage_numbers(result):
    return [{k: v for k, v in stage.items() if k != "model"} for stage in result["results"][0]["stages"]]


@pytest.mark.parametrize("args", [(), ("--sample", "0.3", "--seed", "4")])
def test_bin_chain_gives_the_numbers_of_its_safetensors_twin(bin_twins, args):
    ws = bin_twins
    from_safetensors, from_bin = report(ws, "st.yml", *args), report(ws, "bin.yml", *args)
    assert stage_numbers(from_bin) == stage_numbers(from_safetensors)
    assert [s["model"] for s in from_bin["results"][0]["stages"]] == [
        f"./tiny-quartet-bin/{m}" for m in QUARTET[1:]]
    # Memory-mapped safetensors rows are not held; the vocabulary-aligned embed_tokens and
    # lm_head are (one tensor per model), and so is each pickled tensor being read.
    tensors = load_file(str(ws.models / "miqu" / "model.safetensors"))
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    four_models = len(QUARTET) * sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"peak held: .bin {from_bin['peak_bytes_held']} B, safetensors "
          f"{from_safetensors['peak_bytes_held']} B; largest tensor {largest} B; "
          f"the four models {four_models} B")
    for held in (from_bin["peak_bytes_held"], from_safetensors["peak_bytes_held"]):
        assert 0 < held <= len(QUARTET) * largest <= four_models / 5
