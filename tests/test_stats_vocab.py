"""`stats` on checkpoints whose vocabularies differ in size and order, with
`tokenizer.source` union and base: its counts equal those taken from the stock
mergekit-yaml's own merged output. The aligned inputs the merge compared are
extracted with the stock CLI too (`linear` with weights 1, 0 and 0, 1, under the
same tokenizer settings), so nothing here re-implements mergekit's alignment."""

import json

import numpy as np
import pytest
import torch
from conftest import ON_MERGEKIT_015, Workspace, run_cli
from safetensors.torch import load_file, save_file

from nearswap_mergekit.tiny import TinyLlama, build_family

T = 1e-3
EXTRA_TOKENS = ["<extra_0>", "<extra_1>"]  # a vocabulary padded from V to V + 2
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def vocabulary_variant(source, target, extra_tokens=EXTRA_TOKENS, seed=0):
    """A secondary of `source` whose tokenizer has its ordinary tokens in another
    order and `extra_tokens` at the end; token rows move with their tokens, and 5 %
    of weights stay identical to the source's."""
    gen = torch.Generator().manual_seed(seed)
    target.mkdir()
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    special = {entry["id"] for entry in tokenizer["added_tokens"]}
    ordinary = sorted(i for i in vocab.values() if i not in special)
    shuffled = [ordinary[j] for j in torch.randperm(len(ordinary), generator=gen).tolist()]
    new_id = {old: old for old in special} | dict(zip(ordinary, shuffled))
    tokenizer["model"]["vocab"] = {token: new_id[i] for token, i in vocab.items()}
    size = len(vocab)
    for offset, token in enumerate(extra_tokens):
        tokenizer["added_tokens"].append({
            "id": size + offset, "content": token, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True,
        })
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    (target / "tokenizer_config.json").write_text((source / "tokenizer_config.json").read_text())
    config = json.loads((source / "config.json").read_text())
    config["vocab_size"] = size + len(extra_tokens)
    (target / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(source / "model.safetensors"))
    order = torch.tensor([old for old, _ in sorted(new_id.items(), key=lambda kv: kv[1])])
    out = {}
    for name, tensor in tensors.items():
        moved = tensor + torch.randn(tensor.shape, generator=gen) * 0.01
        moved = torch.where(torch.rand(tensor.shape, generator=gen) < 0.05, tensor, moved)
        if name in VOCAB_TENSORS:
            extra = torch.randn(len(extra_tokens), tensor.shape[1], generator=gen) * 0.02
            moved = torch.cat([moved[order], extra])
        out[name] = moved.contiguous()
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("vocab"))
    build_family(ws.models, ["miqu", "xwin"], TinyLlama(dtype=torch.float32))
    vocabulary_variant(ws.models / "xwin", ws.models / "xwin-padded")
    vocabulary_variant(ws.models / "xwin", ws.models / "xwin-reordered", extra_tokens=[])
    return ws


def recipe(ws, method, models, source, **extra):
    return {
        "merge_method": method,
        "base_model": ws.model("miqu"),
        "models": [{"model": ws.model(m), **({"parameters": p} if p else {})} for m, p in models],
        "dtype": "float32",
        "tokenizer": {"source": source},
        **extra,
    }


@pytest.mark.parametrize(
    "secondary, source",
    [("xwin-padded", "union"), ("xwin-padded", "base"), ("xwin-reordered", "base")],
)
def test_stats_equal_counts_on_the_merged_output(family, secondary, source):
    """Sizes 320 and 322 (union: 322 rows, base: 320), or the same size in another order."""
    ws = family
    case = f"{secondary}-{source}"
    ws.write_recipe(f"ns-{case}.yml", recipe(
        ws, "nearswap_chain", [(secondary, None)], source, parameters={"t": T}))
    for name, weights in (("v0", (1.0, 0.0)), ("v1", (0.0, 1.0))):
        ws.write_recipe(f"{name}-{case}.yml", recipe(
            ws, "linear", [("miqu", {"weight": weights[0]}), (secondary, {"weight": weights[1]})],
            source))
        ws.merge(f"{name}-{case}.yml", f"{name}-{case}")
    ws.merge(f"ns-{case}.yml", f"out-{case}")
    run_cli("nearswap-mergekit", "stats", f"ns-{case}.yml", "--quiet", "--json",
            f"ns-{case}.json", cwd=ws.root, check=True)
    (stage,) = json.loads((ws.root / f"ns-{case}.json").read_text())["results"][0]["stages"]
    by_name = {t["name"]: t for t in stage["tensors"]}
    v0, v1, out = (load_file(str(ws.root / f"{k}-{case}" / "model.safetensors"))
                   for k in ("v0", "v1", "out"))
    base_vocab = json.loads((ws.models / "miqu" / "config.json").read_text())["vocab_size"]
    padded = secondary == "xwin-padded" and source == "union"
    assert v0["model.embed_tokens.weight"].shape[0] == base_vocab + (2 if padded else 0)
    totals = {"elements": 0, "identical": 0, "full": 0, "moved": 0}
    for name in out:
        a, b, r = (x[name].numpy() for x in (v0, v1, out))
        with np.errstate(all="ignore"):
            w = np.clip(np.nan_to_num(np.float32(T) / np.abs(a - b), nan=1, posinf=1), 0, 1)
        counts = {"elements": a.size, "identical": int((a == b).sum()),
                  "full": int((w == 1).sum()), "moved": int((r != a).sum())}
        record = by_name[name]
        assert record["elements"] == counts["elements"], name
        for key, label in (("identical", "identical_fraction"), ("full", "full_swap_fraction"),
                           ("moved", "moved_fraction")):
            assert round(record[label] * record["elements"]) == counts[key], (name, key)
        for key in totals:
            totals[key] += counts[key]
    assert stage["elements"] == totals["elements"]
    assert stage["full_swap_fraction"] == totals["full"] / totals["elements"]
    assert stage["identical_fraction"] == totals["identical"] / totals["elements"]
    assert all(by_name[name]["identical_fraction"] > 0 for name in VOCAB_TENSORS)


def test_mergekit_planning_flags_plan_as_the_merge_does(family):
    """Without `tokenizer:` the merge needs --unsafe-truncate-embeddings (mergekit 0.1.5),
    and so does stats; stats says how to fix the recipe otherwise."""
    ws = family
    plain = recipe(ws, "nearswap_chain", [("xwin-padded", None)], "base", parameters={"t": T})
    del plain["tokenizer"]
    ws.write_recipe("ns-plain.yml", plain)
    refused = run_cli("nearswap-mergekit", "stats", "ns-plain.yml", "--quiet", cwd=ws.root)
    assert refused.returncode and "shapes differ between models" in refused.stderr
    assert "set `tokenizer:`" in refused.stderr
    flagged = run_cli("nearswap-mergekit", "stats", "ns-plain.yml", "--quiet", "--json",
                      "ns-plain.json", "--unsafe-truncate-embeddings", "--allow-crimes",
                      "--lazy-unpickle", cwd=ws.root)
    if not ON_MERGEKIT_015:
        assert flagged.returncode == 2
        assert "--unsafe-truncate-embeddings is not an option of the installed mergekit" in flagged.stderr
        return
    assert flagged.returncode == 0, flagged.stderr
    (stage,) = json.loads((ws.root / "ns-plain.json").read_text())["results"][0]["stages"]
    embed = next(t for t in stage["tensors"] if t["name"] == "model.embed_tokens.weight")
    assert embed["elements"] == 320 * 64  # truncated to the smaller vocabulary
