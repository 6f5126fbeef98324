"""What each NearSwap t does to quality, on a real model family trained here.

    .venv/bin/python benchmarks/quality.py            # about 16 min on 2 cores
    .venv/bin/python benchmarks/quality.py --quick    # the whole pipeline, fewer steps

A small Llama (about 0.85M parameters, byte-level tokenizer) is trained from scratch
on text every Debian machine with this Python has: the standard library's source
("python"), its bundled documentation ("docs", pydoc_data), the licence texts under
/usr/share/common-licenses ("licenses") and the packages' copyright files
("copyright"). The family is shaped like the QuartetAnemoi quartet:

- the ancestor (Llama 2's part): trained on an even mix of the four domains;
- the base (Miqu's part): the ancestor trained three times longer on another mix,
  so that it drifts far from it;
- three children (WinterGoddess, Aurora-Nights, Xwin): the ancestor fine-tuned on
  python, docs and licenses respectively;
- the contrast family: the same three fine-tunes made from the base instead.

The chain base <- child 1 <- child 2 <- child 3 is merged with `nearswap_chain`
through mergekit's own `run_merge`, at t = 0 and at the global t that
`calibration.calibrate` suggests for each of the card's full-swap fractions per pass.
Every model is scored on each domain's held-out text by the rule `nearswap-mergekit
ladder` uses (`nearswap_mergekit.ladder.scoring`: windows of 128 positions, the BOS first; with
one token per byte, perplexity per token is perplexity per byte) and gets a greedy
continuation of one prompt; every rung gets its per-stage full-swap fraction from
`stats`. mergekit's `linear` and `ties` merges of the same models are scored the same
way for context. Then `nearswap-mergekit ladder` itself runs on the same chain and the
same texts at the same t, writing no merge, and its NLL is checked against the written
merges' (the table it prints is what the README shows).

Writes quality.json, quality.png and quality.md (benchmarks/results/ by default).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is local
# OpenMP threads that spin while waiting are 5-10x slower whenever another
# process shares the cores; read once, when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click
import numpy as np
import torch
import yaml
from harness import BIN, HERE, run_child, save_tokenizer, write_json

from nearswap_mergekit.ladder import scoring

RESULTS = HERE / "results"

DOMAINS = ("python", "docs", "licenses", "copyright")
#: Children in chain order: (name, the card's model it stands in for, domain).
CHILDREN = (
    ("child-python", "WinterGoddess-1.4x-70B-L2", "python"),
    ("child-docs", "Aurora-Nights-70B-v1.0", "docs"),
    ("child-licenses", "Xwin-LM-70B-V0.1", "licenses"),
)
#: The card's ladder: t -> fraction fully swapped per pass on QuartetAnemoi.
CARD = ((0.0001, 0.008), (0.0003, 0.02), (0.001, 0.10), (0.0025, 0.18), (0.005, 0.35), (0.01, 0.55))
ANCESTOR_MIX = {"python": 0.25, "docs": 0.25, "licenses": 0.25, "copyright": 0.25}
BASE_MIX = {"python": 0.1, "docs": 0.4, "licenses": 0.1, "copyright": 0.4}
#: Licence boilerplate: every model saw it, and a broken one garbles it at once.
PROMPT = "This program is free software; you can"
#: Byte-level vocabulary: <s>, </s>, then the 256 bytes (token id = byte + 2).
SPECIALS = ("<s>", "</s>")
OFFSET = len(SPECIALS)
MODEL_SHAPE = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2,
)
TIES = {"density": 0.5, "weight": 1.0}  # mergekit's defaults otherwise (normalize: true)


@dataclass(frozen=True)
class Sizes:
    """Everything the run's length depends on."""

    train_bytes: int  # per domain, at most
    heldout_bytes: int  # per domain
    seq_len: int
    batch: int
    ancestor_steps: int
    base_steps: int
    child_steps: int
    ancestor_lr: float = 2e-3
    base_lr: float = 2e-3
    child_lr: float = 5e-4
    sample_tokens: int = 64


FULL = Sizes(train_bytes=1_200_000, heldout_bytes=16_384, seq_len=128, batch=16,
             ancestor_steps=600, base_steps=1800, child_steps=200)
QUICK = Sizes(train_bytes=300_000, heldout_bytes=4_096, seq_len=128, batch=16,
              ancestor_steps=40, base_steps=120, child_steps=15)


QUIET = False
STARTED = time.perf_counter()


def say(message: str) -> None:
    if not QUIET:
        click.echo(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", err=True)


# ---------------------------------------------------------------- corpus

def _python_documents() -> List[bytes]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}
    files = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
    return [p.read_bytes() for p in files]


def _docs_documents() -> List[bytes]:
    from pydoc_data.topics import topics

    return [topics[key].encode() for key in sorted(topics)]


def _unique_files(paths) -> List[bytes]:
    seen, documents = set(), []
    for path in sorted(paths):
        real = path.resolve()  # GPL -> GPL-3 and the like: read each file once
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        documents.append(real.read_bytes())
    return documents


def _licenses_documents() -> List[bytes]:
    return _unique_files(Path("/usr/share/common-licenses").iterdir())


def _copyright_documents() -> List[bytes]:
    return _unique_files(Path("/usr/share/doc").glob("*/copyright"))


#: Read in this order: copyright files quote the licences, and paragraphs seen
#: before (in any domain) are dropped, so held-out text never recurs in training.
SOURCES = (
    ("licenses", _licenses_documents),
    ("copyright", _copyright_documents),
    ("docs", _docs_documents),
    ("python", _python_documents),
)
BLOCK = 2048  # bytes; every 10th block of a domain is held out


def build_corpus(sizes: Sizes) -> Dict[str, Dict[str, np.ndarray]]:
    """Per domain: disjoint train and held-out byte arrays (deterministic)."""
    seen = set()
    corpus = {}
    for domain, documents in SOURCES:
        budget = sizes.train_bytes + sizes.heldout_bytes
        kept, size = [], 0
        for document in documents():
            for paragraph in document.split(b"\n\n"):
                if len(paragraph) >= 64:  # short ones (blank lines, `}`) may repeat
                    key = zlib.crc32(paragraph), len(paragraph)
                    if key in seen:
                        continue
                    seen.add(key)
                kept.append(paragraph + b"\n\n")
                size += len(paragraph) + 2
            if size >= budget * 1.2:
                break
        text = b"".join(kept)
        blocks = [text[i:i + BLOCK] for i in range(0, len(text), BLOCK)]
        held = set(range(9, len(blocks), 10)[: -(-sizes.heldout_bytes // BLOCK)])
        train_bytes = b"".join(b for i, b in enumerate(blocks) if i not in held)[: sizes.train_bytes]
        heldout_bytes = b"".join(blocks[i] for i in sorted(held))[: sizes.heldout_bytes]
        if len(heldout_bytes) < sizes.heldout_bytes or len(train_bytes) < 16 * sizes.seq_len:
            raise click.ClickException(f"too little {domain} text on this machine")
        corpus[domain] = {
            "train": np.frombuffer(train_bytes, dtype=np.uint8),
            # Text, as `ladder --text` reads it: bytes that are not UTF-8 (a character cut
            # at a block's edge, a Latin-1 copyright file) are dropped.
            "heldout": heldout_bytes.decode("utf-8", errors="ignore"),
        }
    return corpus


def to_ids(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.astype(np.int64)) + OFFSET


# ------------------------------------------------------------- models

def build_tokenizer(out_dir: Path):
    """A byte-level tokenizer: one token per byte (id = byte + 2), no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-ins for the 256 bytes, which ByteLevel expects.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    stand_in = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in stand_in:
            stand_in[b] = chr(256 + extra)
            extra += 1
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({stand_in[b]: b + OFFSET for b in range(256)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    sample = PROMPT + "é\x00"
    assert wrapped(sample, add_special_tokens=False)["input_ids"] == (to_ids(np.frombuffer(
        sample.encode(), dtype=np.uint8)).tolist()), "tokenizer is not byte + 2"
    save_tokenizer(wrapped, out_dir)


def new_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256 + OFFSET, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, **MODEL_SHAPE,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def save(model, path: Path, tokenizer_dir: Path) -> Path:
    model.save_pretrained(str(path), safe_serialization=True)
    for file in sorted(tokenizer_dir.iterdir()):
        (path / file.name).write_bytes(file.read_bytes())
    return path


def seed_of(*keys) -> int:
    return zlib.crc32(repr(keys).encode())


def train(model, corpus, mix: Dict[str, float], steps: int, lr: float, weight_decay: float,
          sizes: Sizes, seed: int):
    """AdamW, warm-up then cosine to lr/10; batches of windows drawn by `mix`."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    domains = [d for d in DOMAINS if mix.get(d)]
    streams = [to_ids(corpus[d]["train"]) for d in domains]
    weights = torch.tensor([mix[d] for d in domains], dtype=torch.float64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses = []
    for _ in range(steps):
        picks = torch.multinomial(weights, sizes.batch, replacement=True, generator=gen)
        starts = torch.rand(sizes.batch, generator=gen, dtype=torch.float64)
        batch = torch.stack([
            streams[p][int(s * (len(streams[p]) - sizes.seq_len)):][: sizes.seq_len]
            for p, s in zip(picks.tolist(), starts.tolist())
        ])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------- measurement

def scores(model, tokenizer, corpus, sizes: Sizes) -> Dict[str, Dict]:
    """Per domain, the held-out text scored by the ladder's rule (`scoring`)."""
    texts = [corpus[d]["heldout"] for d in DOMAINS]
    found = scoring.score_model(model, tokenizer, texts, context=sizes.seq_len, batch=64)
    return {
        d: score.report(d, len(text.encode("utf-8")))
        for d, text, score in zip(DOMAINS, texts, found)
    }


@torch.inference_mode()
def continuation(model, sizes: Sizes) -> str:
    """Greedy continuation of PROMPT, decoded from bytes."""
    ids = to_ids(np.frombuffer(PROMPT.encode(), dtype=np.uint8))[None]
    for _ in range(sizes.sample_tokens):
        next_id = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    new = [i - OFFSET for i in ids[0, -sizes.sample_tokens:].tolist() if i >= OFFSET]
    return bytes(new).decode("utf-8", errors="replace")


def evaluate(path: Path, corpus, sizes: Sizes) -> Dict:
    from transformers import AutoTokenizer

    model = load(path)
    scored = scores(model, AutoTokenizer.from_pretrained(str(path)), corpus, sizes)
    return {
        "perplexity": {d: s["perplexity"] for d, s in scored.items()},
        "bits_per_byte": {d: s["bits_per_byte"] for d, s in scored.items()},
        "nll": {d: s["nll"] for d, s in scored.items()},
        "tokens": {d: s["tokens"] for d, s in scored.items()},
        "sample": continuation(model, sizes),
    }


def relative_distance(a: Path, b: Path) -> float:
    """||a - b|| / ||b|| over all weights."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    num = sum(float((x[k] - y[k]).double().pow(2).sum()) for k in y)
    den = sum(float(y[k].double().pow(2).sum()) for k in y)
    return math.sqrt(num / den)


# --------------------------------------------------------------- merges

def merge(document: Dict, out: Path) -> Path:
    """Write the recipe beside `out` and merge it with mergekit's run_merge."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from nearswap_mergekit.method.registration import register

    register()  # a no-op where the start-up hook has done it
    recipe = out.parent / f"{out.name}.yml"
    recipe.write_text(yaml.safe_dump(document, sort_keys=False))
    config = MergeConfiguration.model_validate(document)
    run_merge(config, str(out), MergeOptions(quiet=True, write_model_card=False))
    return out


def chain_recipe(base: Path, children: List[Path], t: float) -> Dict:
    return {
        "merge_method": "nearswap_chain",
        "base_model": str(base),
        "models": [{"model": str(c)} for c in children],
        "parameters": {"t": float(t)},
        "dtype": "float32",
    }


def stage_fractions(recipe: Path) -> List[float]:
    """Each stage's fully swapped fraction at the recipe's t, from `stats` (exact)."""
    from nearswap_mergekit.plan import stats
    from nearswap_mergekit.plan.recipe import Plan

    report = stats.stats_report(Plan(str(recipe)), [None], 1.0, progress=False)
    return [stage["full_swap_fraction"] for stage in report["results"][0]["stages"]]


def ladder(work: Path, base: Path, children: List[Path], corpus, sizes: Sizes) -> List[Dict]:
    """t = 0, then the calibrated global t for each of the card's fractions."""
    from nearswap_mergekit.plan import calibration
    from nearswap_mergekit.plan.recipe import Plan

    probe = work / "calibrate.yml"
    probe.write_text(yaml.safe_dump(chain_recipe(base, children, 0.0), sort_keys=False))
    jobs = Plan(str(probe)).jobs
    rungs = [{"t": 0.0, "card_t": None, "target_full_swap_fraction": None}]
    for card_t, target in CARD:
        suggestion = calibration.calibrate(jobs, target, 1.0, progress=False)
        rungs.append({
            "t": suggestion["global_t"],
            "card_t": card_t,
            "target_full_swap_fraction": target,
            "calibrated_mean_full_swap_fraction": suggestion["global_achieved_full_swap_fraction"],
            "per_stage_t": [stage["t"] for stage in suggestion["stages"]],
        })
    for index, rung in enumerate(rungs):
        out = merge(chain_recipe(base, children, rung["t"]), work / f"nearswap-{index}")
        rung["full_swap_fraction"] = stage_fractions(work / f"nearswap-{index}.yml")
        rung["mean_full_swap_fraction"] = sum(rung["full_swap_fraction"]) / len(children)
        rung.update(evaluate(out, corpus, sizes))
        say(f"  t = {rung['t']:.3g}: full swap {fmt_fractions(rung['full_swap_fraction'])}, "
            f"perplexity {fmt_ppl(rung['perplexity'])}")
    return rungs


def ladder_command(work: Path, base: Path, children: List[Path], corpus, sizes: Sizes,
                   rungs: List[Dict]) -> Dict:
    """Run `nearswap-mergekit ladder` on the chain and the held-out texts, at the card's
    fractions as a user would ask for them, and check it against the written merges:
    the same t, and the same NLL per rung and domain."""
    texts = work / "texts"
    texts.mkdir()
    for domain in DOMAINS:
        (texts / f"{domain}.txt").write_text(corpus[domain]["heldout"], encoding="utf-8")
    recipe = work / "ladder.yml"
    recipe.write_text(yaml.safe_dump(chain_recipe(base, children, 0.0), sort_keys=False))
    arguments = ["ladder", "ladder.yml"]
    arguments += [f for d in DOMAINS for f in ("--text", f"texts/{d}.txt")]
    arguments += [f for _, target in CARD for f in ("--target-swap", f"{100 * target:g}%")]
    arguments += ["--context", str(sizes.seq_len), "--batch", "64", "--json", "ladder.json"]
    command = [str(BIN / "nearswap-mergekit"), *arguments, "--quiet"]
    result, wall_s = run_child(command, "ladder", 3000, cwd=work)
    found = json.loads((work / "ladder.json").read_text())
    differences, t_pairs = [], []
    for rung, written in zip(found["rungs"], rungs, strict=True):
        t_pairs.append((rung["t"], written["t"]))
        for text, domain in zip(rung["texts"], DOMAINS):
            reference = written["nll"][domain]
            differences.append(abs(text["nll"] - reference) / abs(reference))
    return {
        "command": "nearswap-mergekit " + " ".join(arguments),
        "table": result.stdout,
        "stderr": result.stderr,
        "same_t": all(a == b or (a is None and b == 0.0) for a, b in t_pairs),
        "rungs": len(found["rungs"]),
        "max_relative_nll_difference": max(differences),
        "bytes_read": found["bytes_read"],
        "peak_bytes_held": found["peak_bytes_held"],
        "ladder_wall_s": found["wall_seconds"],
        "command_wall_s": wall_s,
    }


def others(work: Path, ties_base: Path, models: List[Path], corpus, sizes: Sizes) -> List[Dict]:
    """mergekit's linear (equal weights) and ties over the same models."""
    linear = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        "dtype": "float32",
    }
    ties_models = [m for m in models if m != ties_base]
    ties = {
        "merge_method": "ties",
        "base_model": str(ties_base),
        "models": [{"model": str(m), "parameters": dict(TIES)} for m in ties_models],
        "dtype": "float32",
    }
    results = []
    for name, document, settings in (
        ("linear", linear, {"models": [m.name for m in models], "weight": 1.0, "normalize": True}),
        ("ties", ties, {"base_model": ties_base.name, "models": [m.name for m in ties_models],
                        **TIES, "normalize": True}),
    ):
        out = merge(document, work / name)
        results.append({"method": name, "settings": settings, **evaluate(out, corpus, sizes)})
        say(f"  {name}: perplexity {fmt_ppl(results[-1]['perplexity'])}")
    return results


# --------------------------------------------------------------- family

def fine_tune(parent: Path, name: str, domain: str, corpus, sizes, out: Path, tokenizer_dir: Path):
    model = load(parent)
    train(model, corpus, {domain: 1.0}, sizes.child_steps, sizes.child_lr, 0.0, sizes,
          seed_of(name, parent.name))
    return save(model, out, tokenizer_dir)


def study(work: Path, sizes: Sizes) -> Dict:
    started = time.perf_counter()
    corpus = build_corpus(sizes)
    say("corpus: " + ", ".join(
        f"{d} {len(corpus[d]['train']) // 1000} KB train / {len(corpus[d]['heldout'].encode()) // 1000} KB held out"
        for d in DOMAINS))
    tokenizer_dir = work / "tokenizer"
    tokenizer_dir.mkdir()
    build_tokenizer(tokenizer_dir)
    models = work / "models"

    say(f"ancestor: {sizes.ancestor_steps} steps")
    model = new_model(seed_of("ancestor"))
    parameters = sum(p.numel() for p in model.parameters())
    train(model, corpus, ANCESTOR_MIX, sizes.ancestor_steps, sizes.ancestor_lr, 0.1, sizes,
          seed_of("ancestor"))
    ancestor = save(model, models / "ancestor", tokenizer_dir)
    say(f"base: {sizes.base_steps} more steps")
    train(model, corpus, BASE_MIX, sizes.base_steps, sizes.base_lr, 0.1, sizes, seed_of("base"))
    base = save(model, models / "base", tokenizer_dir)
    del model

    far, near = [], []
    for name, _, domain in CHILDREN:
        say(f"{name}: {sizes.child_steps} steps on {domain}, from the ancestor and from the base")
        far.append(fine_tune(ancestor, name, domain, corpus, sizes, models / name, tokenizer_dir))
        near.append(fine_tune(base, name, domain, corpus, sizes, models / f"{name}-of-base",
                              tokenizer_dir))

    def child_records(paths):
        return [
            {"name": name, "stand_in_for": card, "domain": domain, **evaluate(p, corpus, sizes)}
            for (name, card, domain), p in zip(CHILDREN, paths)
        ]

    say("evaluating the family")
    family = {
        "ancestor": evaluate(ancestor, corpus, sizes),
        "base": evaluate(base, corpus, sizes),
        "children": child_records(far),
    }
    contrast_models = {"base": family["base"], "children": child_records(near)}
    distances = {
        "base_from_ancestor": relative_distance(base, ancestor),
        "children_from_ancestor": [relative_distance(c, ancestor) for c in far],
        "children_from_base": [relative_distance(c, base) for c in far],
        "contrast_children_from_base": [relative_distance(c, base) for c in near],
    }

    say("NearSwap ladder, children of the ancestor")
    (work / "far").mkdir()
    far_ladder = ladder(work / "far", base, far, corpus, sizes)
    far_others = others(work / "far", ancestor, [base, *far], corpus, sizes)
    say("the same ladder through `nearswap-mergekit ladder` (no merge written)")
    far_command = ladder_command(work / "far", base, far, corpus, sizes, far_ladder)
    say(f"  {far_command['rungs']} rungs in {far_command['command_wall_s']:.1f} s; same t: "
        f"{far_command['same_t']}; largest relative NLL difference from the written merges "
        f"{far_command['max_relative_nll_difference']:.1e}")
    say("NearSwap ladder, children of the base (contrast)")
    (work / "near").mkdir()
    near_ladder = ladder(work / "near", base, near, corpus, sizes)
    near_others = others(work / "near", base, [base, *near], corpus, sizes)

    from importlib.metadata import version

    return {
        "description": (
            "Held-out perplexity (per byte; scored by nearswap_mergekit.ladder.scoring, the ladder's "
            "rule) of a small Llama family trained on this machine, "
            "merged with nearswap_chain at the card's full-swap fractions per pass; "
            "'ladder' and 'others' merge children of the ancestor (far from the base), "
            "'contrast' children of the base itself."
        ),
        "domains": list(DOMAINS),
        "settings": {
            "sizes": asdict(sizes),
            "parameters": parameters,
            "model": MODEL_SHAPE,
            "vocabulary": "bytes 0-255 (id = byte + 2), <s> = 0, </s> = 1",
            "ancestor_mix": ANCESTOR_MIX,
            "base_mix": BASE_MIX,
            "children": [{"name": n, "stand_in_for": c, "domain": d} for n, c, d in CHILDREN],
            "optimizer": "AdamW(betas=(0.9, 0.95)), warm-up 5 %, cosine to lr/10, grad clip 1; "
                         "weight decay 0.1 (ancestor, base), 0 (children)",
            "card": [{"t": t, "full_swap_fraction": f} for t, f in CARD],
            "prompt": PROMPT,
            "merge_dtype": "float32",
            "corpus_bytes": {d: {"train": int(len(corpus[d]["train"])),
                                 "heldout": len(corpus[d]["heldout"].encode("utf-8"))}
                             for d in DOMAINS},
        },
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "mergekit": version("mergekit"),
            "torch_threads": torch.get_num_threads(),
        },
        "distances": distances,
        "models": family,
        "ladder": far_ladder,
        "others": far_others,
        "ladder_command": far_command,
        "contrast": {"models": contrast_models, "ladder": near_ladder, "others": near_others},
        "_wall_s": time.perf_counter() - started,  # popped before writing: the JSON is deterministic
    }


# --------------------------------------------------------------- output

def fmt_ppl(ppl: Dict[str, float]) -> str:
    return ", ".join(f"{d} {ppl[d]:.3f}" for d in DOMAINS)


def fmt_fractions(fractions: List[float]) -> str:
    return " / ".join(f"{100 * f:.2f} %" for f in fractions)


def markdown(report: Dict, wall_s: float, quick: bool) -> str:
    head = "| model | t | full swap % per stage | mean | " + " | ".join(DOMAINS) + " |"
    rule = "|---|---:|---|---:|" + "---:|" * len(DOMAINS)
    missed = []  # rungs whose target calibrate could not reach

    def row(label, ppl, t="", swap="", mean=""):
        return (f"| {label} | {t} | {swap} | {mean} | "
                + " | ".join(f"{ppl[d]:.3f}" for d in DOMAINS) + " |")

    def label_of(rung):
        if rung["card_t"] is None:
            return "nearswap"
        target = rung["target_full_swap_fraction"]
        mark = ""
        if abs(rung["mean_full_swap_fraction"] - target) > 0.25 * target:
            mark = " *"
            missed.append(rung)
        return f"nearswap, {100 * target:g} %{mark} (card t {rung['card_t']:g})"

    def table(models, rungs, extras, ancestor=None):
        lines = [head, rule]
        if ancestor:
            lines.append(row("ancestor", ancestor["perplexity"]))
        lines.append(row("base", models["base"]["perplexity"]))
        for child in models["children"]:
            lines.append(row(f"{child['name']} ({child['domain']})", child["perplexity"]))
        for rung in rungs:
            swap = " / ".join(f"{100 * f:.2f}" for f in rung["full_swap_fraction"])
            lines.append(row(label_of(rung), rung["perplexity"], f"{rung['t']:.4g}", swap,
                             f"{100 * rung['mean_full_swap_fraction']:.2f}"))
        for other in extras:
            lines.append(row(other["method"], other["perplexity"]))
        return "\n".join(lines)

    def samples(family):
        lines = ["| model | continuation |", "|---|---|"]
        records = [("base", family["models"]["base"])]
        records += [(label_of(r) if r["card_t"] else "nearswap, t = 0", r) for r in family["ladder"]]
        records += [(o["method"], o) for o in family["others"]]
        for label, record in records:
            text = json.dumps(record["sample"], ensure_ascii=False)[1:-1].replace("|", "\\|")
            lines.append(f"| {label.replace(' *', '')} | `{text}` |")
        return "\n".join(lines)

    env = report["environment"]
    settings = report["settings"]
    dist = report["distances"]
    command = report["ladder_command"]
    far = table(report["models"], report["ladder"], report["others"], report["models"]["ancestor"])
    near = table(report["contrast"]["models"], report["contrast"]["ladder"],
                 report["contrast"]["others"])
    notes = []
    if missed:
        identical = {id(r): r for r in missed}
        notes.append(
            "\\* Target not reached: " + "; ".join(
                f"{100 * r['target_full_swap_fraction']:g} % gave {100 * r['mean_full_swap_fraction']:.2f} %"
                for r in identical.values())
            + ". Where the children are fine-tunes of the base, weights the fine-tunes never "
            "moved (embedding rows of bytes absent from their domain) are identical, so even "
            "t = 0 swaps that many; calibrate returns the closest t it finds.")
    return "\n".join([
        "# NearSwap quality ladder" + (" (--quick)" if quick else ""),
        "",
        f"Held-out perplexity per byte of a {settings['parameters']:,}-parameter Llama family "
        f"trained here (`benchmarks/quality.py`{' --quick' if quick else ''}; Python {env['python']}, "
        f"torch {env['torch']}, mergekit {env['mergekit']}; {wall_s / 60:.1f} min on "
        f"{os.cpu_count()} cores). Rungs: t = 0 and the global t that `calibrate` suggests "
        "for each of the card's full-swap fractions per pass; full swap % per stage (and "
        "their mean) from `stats`. Scored by the rule `nearswap-mergekit ladder` uses "
        f"(`nearswap_mergekit/ladder/scoring.py`; windows of {settings['sizes']['seq_len']} positions, "
        "the BOS first; one token per byte, so perplexity per token is per byte).",
        "",
        f"Relative weight distance (L2, all weights): base from ancestor "
        f"{dist['base_from_ancestor']:.3f}; children from ancestor "
        + ", ".join(f"{d:.3f}" for d in dist["children_from_ancestor"])
        + "; contrast children from base "
        + ", ".join(f"{d:.3f}" for d in dist["contrast_children_from_base"]) + ".",
        "",
        "## Children of the ancestor (the quartet's shape: the base far diverged)",
        "",
        far,
        "",
        "## Contrast: children of the base (close relatives)",
        "",
        near,
        "",
        *(note + "\n" for note in notes),
        f"linear: equal weights over the base and the three children; ties: density "
        f"{TIES['density']}, weight {TIES['weight']}, normalize, base_model the ancestor "
        "(contrast: the base, the children's parent, with the three children). "
        "All merges float32, through mergekit's `run_merge`.",
        "",
        "## The same ladder, from `nearswap-mergekit ladder`",
        "",
        "The children of the ancestor, the held-out texts as files, the card's fractions "
        "asked for as a user would (no merge written):",
        "",
        "```",
        f"$ {command['command']}",
        command["table"].strip(),
        "```",
        "",
        f"Its t {'are' if command['same_t'] else 'are NOT'} those of the written merges; its NLL "
        f"per rung and text differs from theirs by {command['max_relative_nll_difference']:.1e} "
        f"relative at most. {command['rungs']} rungs in {command['command_wall_s']:.1f} s "
        f"(the ladder's own wall time {command['ladder_wall_s']:.1f} s), "
        f"{command['bytes_read'] / 1e6:.1f} MB read from the inputs.",
        "",
        f"## Greedy continuations of `{json.dumps(PROMPT)[1:-1]}`",
        "",
        "Children of the ancestor:",
        "",
        samples(report),
        "",
        "Contrast:",
        "",
        samples(report["contrast"]),
        "",
    ])


def plot(report: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colours = dict(zip(DOMAINS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    panels = (
        ("children of the ancestor (base far diverged)", report["models"], report["ladder"]),
        ("contrast: children of the base", report["contrast"]["models"], report["contrast"]["ladder"]),
    )
    for ax, (title, models, rungs) in zip(axes, panels):
        x = [100 * r["mean_full_swap_fraction"] for r in rungs]
        low = [xi - 100 * min(r["full_swap_fraction"]) for xi, r in zip(x, rungs)]
        high = [100 * max(r["full_swap_fraction"]) - xi for xi, r in zip(x, rungs)]
        for domain in DOMAINS:
            y = [r["perplexity"][domain] for r in rungs]
            ax.errorbar(x, y, xerr=[low, high], marker="o", ms=4, capsize=2, lw=1.5,
                        color=colours[domain], label=domain)
            ax.axhline(models["base"]["perplexity"][domain], color=colours[domain], lw=0.8, ls=":")
        for card_t, fraction in CARD:
            ax.axvline(100 * fraction, color="0.6", lw=0.8, ls="--")
            ax.annotate(f"{100 * fraction:g} % (card t {card_t:g})", (100 * fraction, 1),
                        xycoords=("data", "axes fraction"), xytext=(2, -4), rotation=90,
                        textcoords="offset points", fontsize=7, color="0.4", va="top")
        # symlog: the t = 0 rung sits at 0, the card's points spread out on a log scale.
        ax.set_xscale("symlog", linthresh=0.5, linscale=0.5)
        ax.set_xlim(-0.05, 100)
        ticks = [0, 0.5, 1, 2, 5, 10, 20, 50, 100]
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("full swap per pass, % (mean of the 3 stages; bars: stage range)")
        ax.grid(True, which="both", alpha=0.2)
    # After both panels: set_yscale on a shared axis resets its formatters.
    low, high = axes[0].get_ylim()
    high *= 1.35  # room above the data for the card's labels
    axes[0].set_ylim(low, high)
    nice = [m * 10**e for e in range(0, 4) for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)]
    axes[0].yaxis.set_major_locator(matplotlib.ticker.FixedLocator([v for v in nice if low <= v <= high]))
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0].set_ylabel("held-out perplexity per byte (dotted: the base alone)")
    axes[0].legend(title="domain", fontsize=8)
    fig.suptitle("NearSwap chain base <- child 1 <- child 2 <- child 3 at the card's "
                 "full-swap fractions (dashed)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command()
@click.option("--quick", is_flag=True, help="The whole pipeline with fewer steps (smoke test).")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=str(RESULTS / "quality.json"),
              show_default=True, help="The JSON report; the PNG and the markdown go beside it.")
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="Keep the checkpoints and recipes here (default: a temporary folder).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def main(quick, out, work, quiet):
    """Train the family, merge it at the card's ladder, measure perplexity."""
    global QUIET
    QUIET = quiet
    torch.set_num_threads(2)  # same reductions, same bits, on any machine
    logging.getLogger("mergekit").setLevel(logging.ERROR)
    # The study merges at t >= 0.0025 on purpose: the large-t warning is for users.
    logging.getLogger("nearswap_mergekit").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    sizes = QUICK if quick else FULL
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nearswap-quality-") as scratch:
        root = Path(work).resolve() if work else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise click.ClickException(f"--work {root} is not empty")
        report = study(root, sizes)
    wall_s = report.pop("_wall_s")
    write_json(out, report)
    out.with_suffix(".md").write_text(markdown(report, wall_s, quick))
    plot(report, out.with_suffix(".png"))
    say(f"wrote {out}, {out.with_suffix('.png').name}, {out.with_suffix('.md').name} "
        f"in {wall_s / 60:.1f} min")


if __name__ == "__main__":
    main()
