"""`nearswap-mergekit compare` and `hash`: two runs of the stock mergekit-yaml
compare bit-identical; a one-ULP change, a missing tensor, a dtype change and a
difference outside a row sample are each reported as they are; a manifest agrees
with the folder it was made from, whatever the sharding."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import mergekit_independent, CONFIGS, run_cli

# Reading checkpoints and rewriting recipes does not change with mergekit's
# version: these run once, with the mergekit 0.1.5 suite.
pytestmark = mergekit_independent
from safetensors.torch import load_file, save_file

from nearswap_mergekit.tools import checkpoints, compare
from nearswap_mergekit.plan.sampling import sample_rows

UP = "model.layers.0.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"


def nearswap(*args, cwd, env=None):
    return run_cli("nearswap-mergekit", *args, "--quiet", cwd=cwd, env=env)


def lines(result) -> list:
    return result.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def merges(workspace):
    """The demo quartet merged twice by the stock mergekit-yaml: compare-a and compare-b."""
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "compare.yml")
    for out in ("compare-a", "compare-b"):
        if not (workspace.root / out).exists():
            workspace.merge("compare.yml", out)
    return workspace.root


def variant(root, name, change, source="compare-b"):
    """A copy of `source` whose tensors `change` edits in place (a dict of tensors)."""
    folder = root / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(root / source, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_two_runs_of_the_same_merge_are_bit_identical(merges):
    result = nearswap("compare", "compare-a", "compare-b", cwd=merges)
    count = len(load_file(str(merges / "compare-a" / "model.safetensors")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result)[-1] == f"bit-identical ({count} tensors)"


def test_one_ulp_is_reported_with_its_tensor_fraction_and_distance(merges):
    before = load_file(str(merges / "compare-b" / "model.safetensors"))[UP]

    def one_ulp(tensors):
        tensors[UP] = tensors[UP].clone()
        tensors[UP].view(torch.int16)[3, 5] += 1

    changed = variant(merges, "compare-ulp", one_ulp)
    after = load_file(str(changed / "model.safetensors"))[UP]
    result = nearswap("compare", "compare-a", "compare-ulp", "--json", "ulp.json", cwd=merges)
    assert result.returncode == 1, result.stdout + result.stderr
    assert lines(result)[-1].endswith(f"tensors differ: {UP}") and lines(result)[-1].startswith("1 of ")
    record = next(t for t in json.loads((merges / "ulp.json").read_text())["tensors"] if t["name"] == UP)
    n = before.numel()
    assert record["status"] == "differs"
    assert (record["elements"], record["identical_elements"]) == (n, n - 1)
    assert record["identical_fraction"] == (n - 1) / n
    assert record["max_ulp"] == 1
    assert record["max_abs_diff"] == abs(after[3, 5].double() - before[3, 5].double()).item() > 0
    assert record["first_difference"] == [3, 5]
    assert f"{UP}  " in result.stdout and "max 1 ULP" in result.stdout


def test_a_tensor_on_one_side_only_is_named(merges):
    variant(merges, "compare-missing", lambda tensors: tensors.pop("model.norm.weight"))
    result = nearswap("compare", "compare-a", "compare-missing", cwd=merges)
    assert result.returncode == 1
    assert "model.norm.weight  only in A" in lines(result)
    assert lines(result)[-1].endswith("tensors differ: model.norm.weight")
    swapped = nearswap("compare", "compare-missing", "compare-a", cwd=merges)
    assert "model.norm.weight  only in B" in lines(swapped)


def test_a_dtype_mismatch_is_named(merges):
    def to_float32(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].float()

    variant(merges, "compare-dtype", to_float32)
    result = nearswap("compare", "compare-a", "compare-dtype", cwd=merges)
    assert result.returncode == 1
    # Same values in another dtype: named as a dtype mismatch, |diff| 0.
    assert "model.norm.weight  dtype float16 in A, float32 in B, max |diff| 0" in lines(result)


def test_a_manifest_agrees_with_the_folder_it_was_made_from(merges):
    made = nearswap("hash", "compare-a", "-o", "compare-a.manifest.json", cwd=merges)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("wrote compare-a.manifest.json (")
    # The Python API writes the same manifest.
    checkpoints.write_json(checkpoints.hash_checkpoint(checkpoints.open_checkpoint(str(merges / "compare-b")),
                                               progress=False), str(merges / "compare-b.manifest.json"))
    manifest = json.loads((merges / "compare-a.manifest.json").read_text())
    assert manifest["format"] == checkpoints.MANIFEST_FORMAT
    assert Path(manifest["source"]).resolve() == (merges / "compare-a").resolve()
    assert manifest["nearswap_mergekit_version"]
    other = json.loads((merges / "compare-b.manifest.json").read_text())
    assert manifest["tensors"] == other["tensors"]

    for a, b in [("compare-a.manifest.json", "compare-b"),
                 ("compare-a.manifest.json", "compare-b.manifest.json")]:
        result = nearswap("compare", a, b, cwd=merges)
        assert result.returncode == 0, result.stdout + result.stderr
        assert lines(result)[-1].startswith("bit-identical (")
        assert "manifest" in result.stdout and "unavailable" in result.stdout

    def change_norm(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2

    variant(merges, "compare-norm", change_norm)
    result = nearswap("compare", "compare-norm", "compare-a.manifest.json", cwd=merges)
    assert result.returncode == 1
    assert "model.norm.weight  differs (by SHA-256; no per-element detail from a manifest)" in lines(result)
    assert lines(result)[-1].endswith("tensors differ: model.norm.weight")


def save_sharded(tensors, folder, shards):
    """The tensors as `shards` safetensors files with an index, as transformers saves them."""
    folder.mkdir()
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[k::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_the_hash_does_not_depend_on_sharding_or_format(merges, tmp_path):
    tensors = load_file(str(merges / "compare-a" / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"] = (
        tensors["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))
    save_sharded(tensors, tmp_path / "three", 3)
    (tmp_path / "one").mkdir()
    save_file(dict(reversed(tensors.items())), str(tmp_path / "one" / "model.safetensors"))
    torch.save(tensors, tmp_path / "pickled.bin")
    changed = dict(tensors)
    changed[UP] = changed[UP].clone()
    changed[UP][0, 0] = -changed[UP][0, 0]
    save_sharded(changed, tmp_path / "changed", 3)

    digests = {}
    for name in ("three", "changed"):
        made = nearswap("hash", name, "-o", f"{name}.json", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        digests[name] = json.loads((tmp_path / f"{name}.json").read_text())["tensors"]
    for name in ("one", "pickled.bin"):  # in-process: the same code without a start-up
        checkpoint = checkpoints.open_checkpoint(str(tmp_path / name))
        digests[name] = checkpoints.hash_checkpoint(checkpoint, progress=False)["tensors"]
    assert len(digests["three"]) == len(tensors)
    assert digests["one"] == digests["three"] == digests["pickled.bin"]
    assert digests["three"]["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "bfloat16"
    differ = [name for name in tensors if digests["changed"][name] != digests["three"][name]]
    assert differ == [UP]
    # The definition, by hand: header and little-endian C-order bytes.
    norm = tensors["model.norm.weight"]
    expected = hashlib.sha256(b"float16[64]\n" + norm.numpy().astype("<f2").tobytes()).hexdigest()
    assert digests["one"]["model.norm.weight"]["sha256"] == expected
    # A sharded folder and a pickled file compare element by element too.
    result = nearswap("compare", "three", "pickled.bin", cwd=tmp_path)
    assert result.returncode == 0 and lines(result)[-1] == f"bit-identical ({len(tensors)} tensors)"


@pytest.mark.parametrize("padding", [0, 62], ids=["all masked", "differing picked out"])
def test_ulp_and_identity_at_special_values(tmp_path, padding):
    """-0.0 vs +0.0: not identical, 0 ULP; max finite vs inf: 1 ULP; the two smallest
    subnormals of opposite sign: 2 ULP; a NaN equals the same NaN, not another payload.
    With identical padding, the few differing elements take the other code path."""
    cases = {  # name: (a, b, identical elements of 2, max ULP, NaN mismatches)
        "zeros": ([0.0, 1.0], [-0.0, 1.0], 1, 0, 0),
        "to_inf": (["max", 1.0], [float("inf"), 1.0], 1, 1, 0),
        "subnormals": (["tiny", 2.0], ["-tiny", 2.0], 1, 2, 0),
        "same_nan": ([float("nan"), 3.0], [float("nan"), 3.0], 2, 0, 0),
        "nan_payload": (["nan", 3.0], ["nan+1", 3.5], 0, None, 1),
    }
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        info, bits = torch.finfo(dtype), {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]

        def make(values):
            out = torch.full((2 + padding,), 0.5, dtype=dtype)
            for i, v in enumerate(values):
                if v == "max":
                    out[i] = info.max
                elif v in ("tiny", "-tiny"):
                    out.view(bits)[i] = 1
                    out[i] = -out[i] if v == "-tiny" else out[i]
                elif v in ("nan", "nan+1"):
                    out[i] = float("nan")
                    out.view(bits)[i] += v == "nan+1"
                else:
                    out[i] = v
            return out

        a = {name: make(case[0]) for name, case in cases.items()}
        b = {name: make(case[1]) for name, case in cases.items()}
        save_file(a, str(tmp_path / "a.safetensors"))
        save_file(b, str(tmp_path / "b.safetensors"))
        result = compare.compare(checkpoints.open_side(str(tmp_path / "a.safetensors")),
                                 checkpoints.open_side(str(tmp_path / "b.safetensors")), progress=False)
        got = {t.name: t for t in result.tensors}
        for name, (_, _, identical, ulp, nans) in cases.items():
            if ulp is None:  # 3.0 vs 3.5, beside the NaN
                ulp = 1 << (round(-math.log2(info.eps)) - 2)
            assert (got[name].identical_elements, got[name].max_ulp, got[name].nan_mismatches) == (
                identical + padding, ulp, nans), (dtype, name)
        assert got["zeros"].max_abs_diff == 0 and got["zeros"].status == "differs"
        assert got["to_inf"].max_abs_diff == float("inf")


@pytest.mark.parametrize("make, args", [
    (lambda root: None, ["compare", "good", "nowhere", "--json", "out.json"]),
    (lambda root: (root / "empty").mkdir(), ["compare", "empty", "good"]),
    (lambda root: (root / "broken.json").write_text("{"), ["compare", "good", "broken.json", "--json", "out.json"]),
    (lambda root: (root / "other.json").write_text('{"format": "something/1"}'), ["compare", "other.json", "good"]),
    (lambda root: (root / "truncated").mkdir() or (root / "truncated" / "model.safetensors")
     .write_bytes(b"\x10\x00\x00"), ["hash", "truncated", "-o", "out.json"]),
    (lambda root: None, ["hash", "nowhere", "-o", "out.json"]),
    (lambda root: None, ["compare", "good", "someone/not-in-the-cache", "--json", "out.json"]),
], ids=["missing folder", "no model files", "unreadable manifest", "not a manifest",
        "truncated safetensors", "hash of a missing folder", "Hub id not cached, offline"])
def test_bad_input_is_one_line_naming_it_exit_2_nothing_written(merges, tmp_path, make, args):
    make(tmp_path)
    shutil.copytree(merges / "compare-a", tmp_path / "good")
    bad = next(arg for arg in args[1:3] if arg != "good")
    result = nearswap(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: {bad}: "), line
    assert not (tmp_path / "out.json").exists()


def test_a_sample_reads_only_its_rows_and_says_so(merges):
    rows, row_len = load_file(str(merges / "compare-b" / "model.safetensors"))[EMBED].shape
    drawn = sample_rows(EMBED, rows, row_len, 0.1, seed=3)
    assert drawn.cluster_rows == 1 and not drawn.exact
    outside = next(row for row in range(rows) if row not in drawn.chosen)
    inside = drawn.chosen[len(drawn.chosen) // 2]

    def change_row(row):
        def change(tensors):
            tensors[EMBED] = tensors[EMBED].clone()
            tensors[EMBED][row, 1] += 1
        return change

    variant(merges, "compare-outside", change_row(outside))
    variant(merges, "compare-inside", change_row(inside))
    sampled = ["--sample", "0.1", "--seed", "3"]

    unseen = nearswap("compare", "compare-a", "compare-outside", *sampled, "--json", "s.json", cwd=merges)
    assert unseen.returncode == 0, unseen.stdout + unseen.stderr
    assert "sample" in lines(unseen)[-1] and "cannot prove" in lines(unseen)[-1]
    assert not lines(unseen)[-1].startswith("bit-identical")
    report = json.loads((merges / "s.json").read_text())
    assert report["bit_identical"] is False and report["sample"] == 0.1
    embed = next(t for t in report["tensors"] if t["name"] == EMBED)
    assert embed["elements"] == len(drawn.chosen) * row_len < rows * row_len

    seen = nearswap("compare", "compare-a", "compare-inside", *sampled, cwd=merges)
    assert seen.returncode == 1 and lines(seen)[-1].endswith(f"differ in a sample of 0.1 of rows: {EMBED}")
    assert f"first at [{inside}, 1]" in seen.stdout
    whole = nearswap("compare", "compare-a", "compare-outside", cwd=merges)
    assert whole.returncode == 1 and f"first at [{outside}, 1]" in whole.stdout
    # A manifest holds digests of whole tensors: no sample of it.
    manifest = checkpoints.hash_checkpoint(checkpoints.open_checkpoint(str(merges / "compare-a")), progress=False)
    checkpoints.write_json(manifest, str(merges / "sampled.manifest.json"))
    refused = nearswap("compare", "sampled.manifest.json", "compare-b", *sampled, cwd=merges)
    assert refused.returncode == 2 and "--sample needs two checkpoints" in refused.stderr


def test_a_hub_id_is_read_from_the_local_cache(merges, tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny-merge" / "snapshots" / "0123abcd"
    shutil.copytree(merges / "compare-a", snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    result = nearswap("compare", "someone/tiny-merge", "compare-b", cwd=merges, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result)[-1].startswith("bit-identical (")
    missing = nearswap("compare", "someone/other-merge", "compare-b", cwd=merges, env=env)
    assert missing.returncode == 2 and "someone/other-merge" in missing.stderr
