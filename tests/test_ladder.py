"""`nearswap-mergekit ladder`: every rung scores exactly as the stock mergekit-yaml
merge at its t, loaded with transformers and scored by the same rule; no
checkpoint is written; the inputs are read once per batch for all rungs; bad
input is one line and exit 2."""

import json
import math
import shutil

import pytest
import torch
import yaml
from conftest import CONFIGS, Workspace, mergekit_independent, run_cli
from safetensors.torch import save_file
from test_stats_vocab import vocabulary_variant

from nearswap_mergekit.ladder import scoring
from nearswap_mergekit.ladder.families import stage_of
from nearswap_mergekit.tiny import TinyLlama, build_family, build_tokenizer

STORY = (
    "NearSwap retains most of the weights of the base model, but when a weight is similar "
    "between the two, it is interpolated to the secondary model value. " * 6
    + "Once upon a time the four winds told a story to the sea and the sky. " * 5
)
NOTES = "A parameter t specifies the sameness threshold. Ünïcödé bytes count too. " * 3
PROMPT = "Once upon a time"
#: The tiny models' outputs are nearly uniform: their NLL moves by ~1e-6 relative from the
#: base to t = 1e-4, and by ~3e-7 for a 1 % change of t. Merged on access, the weights and
#: logits are those of the loaded merge bit for bit, so the NLL is held to far less than that.
RELATIVE = 1e-8


def ladder(ws, *args, check=True, env=None):
    return run_cli("nearswap-mergekit", "ladder", *args, cwd=ws.root, check=check, env=env)


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def assert_scores_as_loaded(row, folder, texts, context, batch=None):
    """A rung's NLL and token counts equal those of the checkpoint in `folder`."""
    model, tokenizer = load(folder)
    expected = scoring.score_model(model, tokenizer, texts, context, batch)
    for got, want in zip(row["texts"], expected):
        assert got["tokens"] == want.tokens, row["label"]
        assert got["nll"] == pytest.approx(want.nll, rel=RELATIVE), row["label"]
    return model, tokenizer


def files_under(*folders):
    return {path for folder in folders for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def quartet(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ladder"))
    build_family(ws.models)
    shutil.copy(CONFIGS / "demo-quartet.yml", ws.root / "quartet.yml")
    (ws.root / "story.txt").write_text(STORY, encoding="utf-8")
    (ws.root / "notes.txt").write_text(NOTES, encoding="utf-8")
    return ws


def test_every_rung_scores_as_the_stock_merge_and_nothing_is_written(quartet, tmp_path):
    """The demo quartet (float16, `tokenizer: source: base`), context 64, 3 windows per
    forward: several batches of story.txt and notes.txt; each rung against mergekit-yaml
    run on the recipe `--recipes` wrote for it, the base row against the base."""
    ws = quartet
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    before = files_under(ws.root, scratch)
    result = ladder(ws, "quartet.yml", "--text", "story.txt", "--text", "notes.txt",
                    "--t", "1e-4", "--t", "1e-3", "--target-swap", "20%", "--context", "64",
                    "--batch", "3", "--prompt", PROMPT, "--max-new-tokens", "5", "--json",
                    "ladder.json", "--plot", "ladder.png", "--recipes", "rungs", "--quiet",
                    env={"TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr
    new = files_under(ws.root, scratch) - before
    written = {"ladder.json", "ladder.png", "rungs/quartet-t0.0001.yml", "rungs/quartet-t0.001.yml",
               "rungs/quartet-swap20pct.yml"}
    assert {str(path.relative_to(ws.root)) for path in new} == written
    report = json.loads((ws.root / "ladder.json").read_text())
    labels = [rung["label"] for rung in report["rungs"]]
    assert labels[0] == "base" and set(labels[1:]) == {"t=0.0001", "t=0.001", "swap 20%"}
    texts = [STORY, NOTES]
    _, tokenizer = load(ws.models / "miqu")
    windows = scoring.prepare(["story.txt", "notes.txt"], texts, tokenizer, 64).windows
    assert report["context"] == 64 and report["batches"] == len(scoring.batches(windows, 3)) > 3
    assert [t["bytes"] for t in report["texts"]] == [len(t.encode()) for t in texts]

    base = report["rungs"][0]
    assert base["t"] is None and base["full_swap"] is None
    assert all(s["kl_from_base"] == 0 and s["top1_agreement"] == 1 for s in base["texts"])
    assert_scores_as_loaded(base, ws.models / "miqu", texts, 64, 3)
    for rung in report["rungs"][1:]:
        recipe = f"rungs/quartet-{rung['label'].replace('=', '').replace('%', 'pct').replace(' ', '')}.yml"
        assert yaml.safe_load((ws.root / recipe).read_text())["parameters"]["t"] == rung["t"]
        out = f"merged-{rung['label']}".replace(" ", "-").replace("%", "pct")
        ws.merge(recipe, out)
        model, tokenizer = assert_scores_as_loaded(rung, ws.root / out, texts, 64, 3)
        assert len(rung["full_swap"]) == 3 and all(0 < f < 1 for f in rung["full_swap"])
        assert all(s["kl_from_base"] > 0 for s in rung["texts"])
        prompt = torch.tensor([[tokenizer.bos_token_id, *scoring.tokenize(tokenizer, PROMPT)]])
        greedy = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.eos_token_id)
        expected = tokenizer.decode(greedy[0, prompt.shape[1]:].tolist(), skip_special_tokens=True)
        assert rung["continuations"] == [{"prompt": PROMPT, "continuation": expected}]

    # The --target-swap rung is at calibrate's global t.
    run_cli("nearswap-mergekit", "calibrate", "quartet.yml", "--target-swap", "0.2", "--json",
            "calibrated.json", "--quiet", cwd=ws.root, check=True)
    swap = next(rung for rung in report["rungs"] if rung["label"] == "swap 20%")
    assert swap["t"] == json.loads((ws.root / "calibrated.json").read_text())["global_t"]

    # Every rung's full-swap column, taken from the reads the ladder makes anyway over
    # several batches, is the one `stats` reports from a pass of its own.
    ts = [rung["t"] for rung in report["rungs"][1:]]
    run_cli("nearswap-mergekit", "stats", "quartet.yml", *(a for t in ts for a in ("--t", repr(t))),
            "--json", "stats.json", "--quiet", cwd=ws.root, check=True)
    stats = json.loads((ws.root / "stats.json").read_text())["results"]
    for rung, result in zip(report["rungs"][1:], stats, strict=True):
        assert rung["full_swap"] == [stage["full_swap_fraction"] for stage in result["stages"]], rung["label"]

    # Streamed layer by layer: the inputs read once in all, for every rung; merged
    # weights held for one stage at a time (every row's copy), never a row's model whole.
    inputs = sum((ws.models / m / "model.safetensors").stat().st_size for m in
                 ("miqu", "wintergoddess", "aurora-nights", "xwin"))
    assert report["path"] == "layers" and report["passes"] == 1
    assert report["bytes_read"] <= 1.05 * inputs
    stage_bytes = {}
    for name, tensor in ws.load("miqu").items():
        stage = stage_of(name)  # the embedding, a layer, or the norm and head
        stage_bytes[stage] = stage_bytes.get(stage, 0) + tensor.numel() * 4  # float32
    rows = len(report["rungs"])
    assert 0 < report["peak_bytes_held"] <= rows * max(stage_bytes.values()) < rows * sum(stage_bytes.values())


def test_with_inputs_adds_each_secondary_alone(quartet):
    """--with-inputs: after the rungs, one reference row per secondary, scoring as that
    checkpoint loaded from its folder (the quartet shares one vocabulary)."""
    ws = quartet
    ladder(ws, "quartet.yml", "--text", "notes.txt", "--t", "1e-3", "--context", "64",
           "--with-inputs", "--json", "inputs.json", "--quiet")
    report = json.loads((ws.root / "inputs.json").read_text())
    secondaries = ["wintergoddess", "aurora-nights", "xwin"]
    labels = [rung["label"] for rung in report["rungs"]]
    assert labels == ["base", "t=0.001", *(f"alone: ./tiny-quartet/{name}" for name in secondaries)]
    # The full-swap column, taken from the reads the ladder makes anyway, is the
    # one `stats` reports from a pass of its own.
    run_cli("nearswap-mergekit", "stats", "quartet.yml", "--t", "1e-3", "--json", "stats.json",
            "--quiet", cwd=ws.root, check=True)
    stages = json.loads((ws.root / "stats.json").read_text())["results"][0]["stages"]
    assert report["rungs"][1]["full_swap"] == [stage["full_swap_fraction"] for stage in stages]
    for name, row in zip(secondaries, report["rungs"][2:]):
        assert row["t"] is None and row["full_swap"] is None
        assert row["texts"][0]["kl_from_base"] > 0
        assert_scores_as_loaded(row, ws.models / name, [NOTES], 64)


def test_with_inputs_lists_every_secondary_of_a_sliced_recipe(quartet):
    """Slices give the layers' stage to different models: each still gets its row."""
    ws = quartet
    ws.write_recipe("sliced.yml", {
        "merge_method": "nearswap_chain",
        "base_model": ws.model("miqu"),
        "slices": [
            {"sources": [{"model": ws.model("miqu"), "layer_range": [0, 1]},
                         {"model": ws.model("wintergoddess"), "layer_range": [0, 1]}]},
            {"sources": [{"model": ws.model("miqu"), "layer_range": [1, 2]},
                         {"model": ws.model("xwin"), "layer_range": [1, 2]}]},
        ],
        "parameters": {"t": 1e-3},
        "dtype": "float16",
    })
    ladder(ws, "sliced.yml", "--text", "notes.txt", "--context", "64", "--with-inputs",
           "--json", "sliced.json", "--quiet")
    labels = [rung["label"] for rung in json.loads((ws.root / "sliced.json").read_text())["rungs"]]
    assert labels[2:] == [f"alone: {ws.model('wintergoddess')}", f"alone: {ws.model('xwin')}"]


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """float32 base and a secondary with its vocabulary reordered and padded by two."""
    ws = Workspace(tmp_path_factory.mktemp("ladder-vocab"))
    build_family(ws.models, ["miqu", "xwin"], TinyLlama(dtype=torch.float32))
    vocabulary_variant(ws.models / "xwin", ws.models / "xwin-padded")
    (ws.root / "story.txt").write_text(STORY, encoding="utf-8")
    return ws


def union_recipe(ws, t):
    return {
        "merge_method": "nearswap_chain",
        "base_model": ws.model("miqu"),
        "models": [{"model": ws.model("xwin-padded")}],
        "parameters": {"t": t},
        "dtype": "float32",
        "tokenizer": {"source": "union"},
    }


def test_a_union_vocabulary_scores_as_the_stock_merge(padded):
    """`tokenizer: source: union` over 320 and 322 tokens: the recipe's own t (no --t),
    and the base row against mergekit-yaml at t = 0 (322 rows: no base to load)."""
    ws = padded
    ws.write_recipe("union.yml", union_recipe(ws, 1e-3))
    ws.write_recipe("union-0.yml", union_recipe(ws, 0.0))
    ladder(ws, "union.yml", "--text", "story.txt", "--json", "union.json", "--quiet")
    report = json.loads((ws.root / "union.json").read_text())
    assert report["context"] == 256  # the model's max_position_embeddings < 2048
    base, rung = report["rungs"]
    assert rung["label"] == "recipe" and rung["t"] == 1e-3
    for recipe, row in (("union.yml", rung), ("union-0.yml", base)):
        out = f"merged-{recipe[:-4]}"
        ws.merge(recipe, out)
        assert json.loads((ws.root / out / "config.json").read_text())["vocab_size"] == 322
        assert_scores_as_loaded(row, ws.root / out, [STORY], 256)


def qwen2_family(root, names=("base", "second", "third")):
    """Tiny Qwen2 checkpoints (q/k/v biases, embeddings tied to the output, so no
    lm_head in the files) in float32, with a tokenizer that has no BOS."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    first = root / names[0]
    first.mkdir(parents=True)
    build_tokenizer(first)
    settings = json.loads((first / "tokenizer_config.json").read_text())
    (first / "tokenizer_config.json").write_text(json.dumps({**settings, "bos_token": None}))
    tokenizer = AutoTokenizer.from_pretrained(str(first))
    assert tokenizer.bos_token_id is None
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    base = {name: tensor.contiguous() for name, tensor in Qwen2ForCausalLM(config).state_dict().items()
            if name != "lm_head.weight"}
    for index, name in enumerate(names):
        folder = root / name
        folder.mkdir(exist_ok=True)
        config.save_pretrained(str(folder))
        if index:
            for file in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(first / file, folder / file)
        tensors = {key: value + (torch.randn(value.shape) * 0.01 if index else 0) for key, value in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_a_tied_qwen2_without_bos_scores_as_the_stock_merge(tmp_path):
    """Another architecture, with tied embeddings, windows that overlap by one token
    (no BOS), a bfloat16 merge of float32 inputs, and the base's tokenizer copied."""
    from transformers import AutoModelForCausalLM

    ws = Workspace(tmp_path)
    qwen2_family(ws.models)
    (ws.root / "story.txt").write_text(STORY, encoding="utf-8")
    recipe = {
        "merge_method": "nearswap_chain",
        "base_model": ws.model("base"),
        "models": [{"model": ws.model("second")}, {"model": ws.model("third")}],
        "parameters": {"t": 1e-3},
        "dtype": "bfloat16",
    }
    ws.write_recipe("qwen2.yml", recipe)
    ladder(ws, "qwen2.yml", "--text", "story.txt", "--json", "qwen2.json", "--quiet")
    report = json.loads((ws.root / "qwen2.json").read_text())
    base, rung = report["rungs"]
    assert report["context"] == 128 and report["batches"] == 2  # full windows, then the tail
    assert rung["texts"][0]["tokens"] == report["texts"][0]["tokens"] - 1
    ws.merge("qwen2.yml", "merged")
    assert_scores_as_loaded(rung, ws.root / "merged", [STORY], 128)
    # The base row: the base as the bfloat16 merge reads it.
    model = AutoModelForCausalLM.from_pretrained(str(ws.models / "base"), dtype=torch.bfloat16).float()
    _, tokenizer = load(ws.root / "merged")
    (expected,) = scoring.score_model(model.eval(), tokenizer, [STORY], 128)
    assert base["texts"][0]["nll"] == pytest.approx(expected.nll, rel=RELATIVE)


@pytest.fixture(scope="module")
def broken(padded):
    """A base without tokenizer files, and a recipe of another method."""
    ws = padded
    folder = ws.models / "no-tokenizer"
    if not folder.exists():
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(ws.models / "miqu" / name, folder / name)
        recipe = {**union_recipe(ws, 1e-3), "models": [{"model": ws.model("xwin")}]}
        del recipe["tokenizer"]
        ws.write_recipe("plain.yml", recipe)
        ws.write_recipe("no-tokenizer.yml", {**recipe, "base_model": ws.model("no-tokenizer")})
        ws.write_recipe("linear.yml", {**recipe, "merge_method": "linear"})
        (ws.root / "empty.txt").write_bytes(b"")
        (ws.root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return ws


BAD = [
    (["plain.yml", "--text", "missing.txt"], "text 'missing.txt' does not exist"),
    (["plain.yml", "--text", "empty.txt"], "text 'empty.txt' is empty"),
    (["plain.yml", "--text", "latin1.txt"], "text 'latin1.txt' is not UTF-8"),
    (["plain.yml", "--text", "story.txt", "--context", "1"], "--context 1: a window needs 2 positions"),
    (["plain.yml", "--text", "story.txt", "--context", "257"],
     "--context 257 is more than the model's 256 positions"),
    (["linear.yml", "--text", "story.txt"], "uses merge_method 'linear'; ladder scores 'nearswap_chain'"),
    (["no-tokenizer.yml", "--text", "story.txt"], "has no tokenizer that transformers can load"),
    (["plain.yml", "--text", "story.txt", "--t", "-1e-4"], "must be a finite number >= 0"),
    (["plain.yml", "--text", "story.txt", "--device", "cuda"], "sees no CUDA device"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(broken, args, message, monkeypatch):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from click.testing import CliRunner

    from nearswap_mergekit.cli import main

    monkeypatch.chdir(broken.root)
    before = files_under(broken.root)
    command = ["ladder", *args, "--quiet", "--json", "bad.json"]
    if args[0] == "no-tokenizer.yml":
        # In a process of its own: mergekit caches models' loaders by their (relative)
        # path for the life of a process, and earlier tests used the same paths elsewhere.
        ran = run_cli("nearswap-mergekit", *command, cwd=broken.root)
        exit_code, output = ran.returncode, ran.stdout + ran.stderr
    else:
        ran = CliRunner().invoke(main, command)
        exit_code, output = ran.exit_code, ran.output
    assert exit_code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], output
    assert files_under(broken.root) == before


class Uniform(torch.nn.Module):
    """A stand-in model whose next-token distribution is uniform, or sharp on one token."""

    def __init__(self, vocabulary, favourite=None):
        super().__init__()
        self.vocabulary, self.favourite = vocabulary, favourite

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocabulary)
        if self.favourite is not None:
            logits[..., self.favourite] = 10.0
        return type("Output", (), {"logits": logits})


@mergekit_independent
def test_windows_follow_the_rule():
    ids = list(range(10, 17))  # 7 text tokens
    with_bos = scoring.windows(ids, 4, bos=1)
    assert [w.ids for w in with_bos] == [(1, 10, 11, 12), (1, 13, 14, 15), (1, 16)]
    assert sum(w.scored for w in with_bos) == 7  # every text token
    without = scoring.windows(ids, 4, bos=None)
    assert [w.ids for w in without] == [(10, 11, 12, 13), (13, 14, 15, 16)]  # overlap: one token
    assert sum(w.scored for w in without) == 6  # all but the first
    assert [w.ids for w in scoring.windows(ids[:5], 4, None)] == [(10, 11, 12, 13), (13, 14)]
    groups = scoring.batches(with_bos + scoring.windows(ids[:3], 4, 1, text=1), batch=2)
    assert [[w.ids for w in g] for g in groups] == [
        [(1, 10, 11, 12), (1, 13, 14, 15)], [(1, 10, 11, 12)], [(1, 16)]]


@mergekit_independent
def test_scores_of_a_known_distribution():
    tokenizer = type("Tokenizer", (), {"bos_token_id": 0,
                                       "encode": lambda self, text, **_: [2 + ord(c) % 5 for c in text]})()
    text = "abcdefghij"  # 10 tokens, 10 bytes
    (uniform,) = scoring.score_model(Uniform(8), tokenizer, [text], context=4)
    report = uniform.report("x", 10)
    assert report["tokens"] == 10 and report["nll"] == pytest.approx(10 * math.log(8))
    assert report["perplexity"] == pytest.approx(8) and report["bits_per_byte"] == pytest.approx(3)
    # KL(base || model) and top-1 agreement against a model sure of token 2.
    base_logp = scoring.log_probs(Uniform(8)(torch.zeros(1, 5, dtype=torch.long)).logits)
    sharp_logp = scoring.log_probs(Uniform(8, favourite=2)(torch.zeros(1, 5, dtype=torch.long)).logits)
    scores = [scoring.Score()]
    scoring.add_batch(scores, [scoring.Window(0, (0, 2, 3, 4, 2))], sharp_logp, base_logp)
    expected_kl = float((base_logp.exp() * (base_logp - sharp_logp)).sum(-1).mean())
    assert scores[0].kl / scores[0].tokens == pytest.approx(expected_kl) and expected_kl > 1
    assert scores[0].agree == 0  # the uniform base's argmax is token 0, never 2
    scoring.add_batch(scores, [scoring.Window(0, (0, 2, 3, 4, 2))], sharp_logp, sharp_logp)
    assert scores[0].agree == 4 and scores[0].tokens == 8
