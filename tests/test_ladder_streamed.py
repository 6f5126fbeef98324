"""The ladder streamed layer by layer: each rung scores as the stock mergekit-yaml
merge loaded whole, over many batches and several passes, on families whose
layers get other masks (Mistral's sliding window shorter than the context, Qwen2
with both sliding and full attention layers); each pass reads the inputs once."""

import json

import pytest
import torch
from conftest import Workspace, run_cli
from safetensors.torch import save_file
from test_ladder import RELATIVE, STORY, assert_scores_as_loaded

from nearswap_mergekit.tiny import build_tokenizer

CONTEXT = 64
#: Windows of CONTEXT positions two at a time: STORY gives 8 batches or more.
BATCH = 2


def family(root, kind: str, names=("base", "second", "third")):
    """Tiny float32 checkpoints of `kind` with a BOS-adding tokenizer; secondaries a
    small delta from the base."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    first = root / names[0]
    first.mkdir(parents=True)
    build_tokenizer(first)
    tokenizer = AutoTokenizer.from_pretrained(str(first))
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id)
    if kind == "mistral":
        # A window shorter than the context: the mask differs from the causal one.
        config = MistralConfig(**shape, num_hidden_layers=2, sliding_window=16,
                               architectures=["MistralForCausalLM"])
        model_class = MistralForCausalLM
    else:
        # Sliding attention in the layers from max_window_layers on, full below it.
        config = Qwen2Config(**shape, num_hidden_layers=3, use_sliding_window=True, sliding_window=16,
                             max_window_layers=1, tie_word_embeddings=False,
                             architectures=["Qwen2ForCausalLM"])
        model_class = Qwen2ForCausalLM
    torch.manual_seed(1)
    base = {name: tensor.contiguous() for name, tensor in model_class(config).state_dict().items()}
    for index, name in enumerate(names):
        folder = root / name
        folder.mkdir(exist_ok=True)
        config.save_pretrained(str(folder))
        if index:
            for file in ("tokenizer.json", "tokenizer_config.json"):
                (folder / file).write_bytes((first / file).read_bytes())
        tensors = {key: value + (torch.randn(value.shape) * 0.01 if index else 0) for key, value in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return config


def ladder(ws, *args):
    return run_cli("nearswap-mergekit", "ladder", *args, cwd=ws.root, check=True)


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def streamed(request, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp(f"streamed-{request.param}"))
    config = family(ws.models, request.param)
    (ws.root / "story.txt").write_text(STORY * 2, encoding="utf-8")
    ws.write_recipe("chain.yml", {
        "merge_method": "nearswap_chain",
        "base_model": ws.model("base"),
        "models": [{"model": ws.model("second")}, {"model": ws.model("third")}],
        "parameters": {"t": 1e-3},
        "dtype": "float32",
    })
    common = ["chain.yml", "--text", "story.txt", "--context", str(CONTEXT), "--batch", str(BATCH),
              "--quiet", "--json"]
    ladder(ws, *common, "one-pass.json")
    one_pass = json.loads((ws.root / "one-pass.json").read_text())
    # A budget of three batches' hidden states (base row and rung, float32): several passes.
    budget = 3 * 2 * BATCH * CONTEXT * config.hidden_size * 4
    ladder(ws, *common, "passes.json", "--memory-budget", str(budget))
    ladder(ws, *common, "whole.json", "--whole-model")
    reports = {name: json.loads((ws.root / f"{name}.json").read_text()) for name in ("passes", "whole")}
    inputs = sum((ws.models / name / "model.safetensors").stat().st_size for name in ("base", "second", "third"))
    return ws, config, one_pass, reports["passes"], reports["whole"], inputs


def test_the_families_are_streamed_with_their_masks(streamed):
    _ws, config, one_pass, passes, whole, _inputs = streamed
    assert one_pass["path"] == passes["path"] == "layers"
    assert whole["path"] == "whole model: --whole-model"
    if config.model_type == "qwen2" and getattr(config, "layer_types", None):
        assert set(config.layer_types) == {"full_attention", "sliding_attention"}
    assert config.sliding_window < CONTEXT
    assert one_pass["passes"] == 1 and passes["passes"] >= 3
    assert one_pass["batches"] == passes["batches"] == whole["batches"] >= 8


def test_every_pass_reads_the_inputs_once(streamed):
    _ws, _config, one_pass, passes, whole, inputs = streamed
    assert one_pass["bytes_read"] <= 1.05 * inputs
    assert passes["bytes_read"] <= 1.05 * inputs * passes["passes"]
    assert passes["bytes_read"] >= 0.95 * inputs * passes["passes"]
    # The whole model per batch: once per batch, the reads streaming saves.
    assert whole["bytes_read"] >= 0.95 * inputs * whole["batches"]


def test_streamed_rungs_score_as_the_stock_merge_in_one_pass_or_several(streamed):
    ws, _config, one_pass, passes, whole, _inputs = streamed
    for report in (one_pass, passes, whole):
        for row, other in zip(report["rungs"], one_pass["rungs"]):
            assert row["label"] == other["label"]
            assert row["texts"][0]["tokens"] == other["texts"][0]["tokens"]
            assert row["texts"][0]["nll"] == pytest.approx(other["texts"][0]["nll"], rel=RELATIVE)
            assert row["full_swap"] == other["full_swap"]
    ws.merge("chain.yml", "merged")
    assert_scores_as_loaded(one_pass["rungs"][1], ws.root / "merged", [STORY * 2], CONTEXT, BATCH)
    assert_scores_as_loaded(passes["rungs"][1], ws.root / "merged", [STORY * 2], CONTEXT, BATCH)


def test_a_memory_budget_below_one_batch_names_the_smallest(streamed):
    ws, config, *_ = streamed
    result = run_cli("nearswap-mergekit", "ladder", "chain.yml", "--text", "story.txt", "--context",
                     str(CONTEXT), "--batch", str(BATCH), "--memory-budget", "1000", "--json", "bad.json",
                     cwd=ws.root)
    smallest = 2 * BATCH * CONTEXT * config.hidden_size * 4  # base row and the recipe's rung
    assert result.returncode == 2 and not (ws.root / "bad.json").exists()
    assert result.stderr.strip().splitlines() == [
        f"Error: --memory-budget 1,000 bytes is less than one batch's hidden states for every row "
        f"({smallest:,} bytes): give --memory-budget {smallest:,} or more, or a smaller --batch"]
    huge = run_cli("nearswap-mergekit", "ladder", "chain.yml", "--text", "story.txt", "--memory-budget",
                   "1000T", cwd=ws.root)
    assert huge.returncode == 2 and "is more than this machine's" in huge.stderr
    both = run_cli("nearswap-mergekit", "ladder", "chain.yml", "--text", "story.txt", "--memory-budget",
                   "1G", "--whole-model", cwd=ws.root)
    assert both.returncode == 2 and "leave --memory-budget out" in both.stderr


def test_calibration_reads_are_reported_apart(streamed):
    """--target-swap calibrates first (calibrate's two read passes over the inputs,
    under bytes_read_calibration); the scoring still reads the inputs once."""
    ws, _config, one_pass, _passes, _whole, inputs = streamed
    if ws.root.name.startswith("streamed-qwen2"):
        pytest.skip("the same code on either family: run once")
    ladder(ws, "chain.yml", "--text", "story.txt", "--context", str(CONTEXT), "--batch", str(BATCH),
           "--target-swap", "1%", "--quiet", "--json", "target.json")
    report = json.loads((ws.root / "target.json").read_text())
    assert one_pass["bytes_read_calibration"] == 0
    assert report["bytes_read"] <= 1.05 * inputs
    assert 1.95 * inputs <= report["bytes_read_calibration"] <= 2.05 * inputs
