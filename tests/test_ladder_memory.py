"""`nearswap-mergekit ladder` holds one layer's weights at a time, not the model's: the
peak anonymous memory (RssAnon) of a ladder over a 4-layer family is within one
layer's inputs of the same ladder over a 2-layer family of the same shapes, also
when a small --memory-budget splits it into several passes. And its peak above what
it held when it started scoring is within the documented formula: one layer's
inputs + every row's merged layer + one pass's hidden states + one batch's
activations and log-probabilities (+ every row's embedding where tied)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIN, only_mergekit_015

from nearswap_mergekit.tiny import QUARTET, TinyLlama, _llama_config, build_family, llama_tensor_shapes

# What the ladder holds is its own, the same with every mergekit: run once, with 0.1.5.
pytestmark = only_mergekit_015

#: Layers of 1024 x 2816 MLP matrices: one layer's inputs (four float16 models) are
#: 90 MiB, several times the 3-14 MiB by which the two peaks differ from run to run
#: (also with other jobs on every core), and a ladder that kept what it merged would
#: hold about three times that more on the deeper family.
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=4)
LAYERS = (2, 4)
TS = ("1e-4", "1e-3")
TEXT = "Once upon a time the four winds told a story to the sea and the sky. " * 3
#: RssAnon is polled this often: a module's merged weights live for tens of
#: milliseconds here, so every run sees its peak many times over.
POLL_S = 0.002
#: glibc serves blocks under its mmap threshold from per-thread heaps and keeps them
#: when freed; the threshold rises (up to 32 MiB) with every larger block freed, so
#: it ends above every tensor of this family, and RssAnon then grows with the number
#: of allocations, by about 30 MB per layer here (a 70B's tensors are mostly above
#: 32 MiB and are returned when freed). A fixed threshold makes RssAnon follow what
#: the ladder holds.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def layer_input_bytes(spec: TinyLlama) -> int:
    """One decoder layer's weights in all four models, as stored."""
    shapes = llama_tensor_shapes(_llama_config(spec, vocab_size=320))
    layer = sum(math.prod(shape) for name, shape in shapes.items() if name.startswith("model.layers.0."))
    return len(QUARTET) * layer * torch.empty((), dtype=spec.dtype).element_size()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """The quartet with 2 and with 4 layers (same shapes), a recipe for each, and a text."""
    root = tmp_path_factory.mktemp("ladder-memory")
    (root / "story.txt").write_text(TEXT, encoding="utf-8")
    recipes = {}
    for layers in LAYERS:
        models = build_family(root / f"quartet-{layers}L", QUARTET, TinyLlama(num_hidden_layers=layers, **SHAPE))
        base, *secondaries = (str(models[name]) for name in QUARTET)
        recipes[layers] = root / f"quartet-{layers}L.yml"
        recipes[layers].write_text(yaml.safe_dump({
            "merge_method": "nearswap_chain", "base_model": base,
            "models": [{"model": path} for path in secondaries],
            "parameters": {"t": 1e-4}, "dtype": "float16",
        }, sort_keys=False))
    return root, recipes


def rss_anon(pid: int) -> int:
    """The process's anonymous resident memory in bytes; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssAnon:")), 0)


def polled_peak_anon(args, root: Path) -> int:
    """Run `args` in `root` (offline, ALLOCATOR set) until it exits 0; the peak of its RssAnon."""
    process = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", **ALLOCATOR})
    peak = 0
    while process.poll() is None:
        peak = max(peak, rss_anon(process.pid))
        time.sleep(POLL_S)
    assert process.returncode == 0, process.stderr.read().decode()
    return peak


def ladder_peak_anon(root: Path, recipe: Path, *extra: str) -> int:
    """Run the ladder in a subprocess; the peak of its RssAnon, polled."""
    args = [str(BIN / "nearswap-mergekit"), "ladder", str(recipe), "--text", "story.txt", "--quiet",
            "--json", f"{recipe.stem}.json", *extra]
    for t in TS:
        args += ["--t", t]
    peak = polled_peak_anon(args, root)
    report = json.loads((root / f"{recipe.stem}.json").read_text())
    assert len(report["rungs"]) == 1 + len(TS) and report["bytes_read"] > 0
    return peak


def test_peak_memory_does_not_grow_with_depth(families):
    """Two more layers add less than one layer's inputs to the peak (RssAnon); a ladder
    that held every merged weight would add about three (three rows of float32 copies
    of two layers)."""
    root, recipes = families
    if "RssAnon:" not in Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else True:
        pytest.skip("needs Linux's /proc/PID/status RssAnon")
    bound = layer_input_bytes(TinyLlama(**SHAPE))
    shallow, deep = (ladder_peak_anon(root, recipes[layers]) for layers in LAYERS)
    assert shallow > 0 and deep > 0
    mib = 2**20
    assert deep - shallow < bound, (
        f"peak RssAnon {shallow / mib:.0f} MiB with {LAYERS[0]} layers, {deep / mib:.0f} MiB with "
        f"{LAYERS[1]}: {(deep - shallow) / mib:.0f} MiB more, one layer's inputs are {bound / mib:.0f} MiB"
    )
    # Forced into several passes by a budget of one batch's hidden states (3 rows of
    # 16 positions x 1024 float32): each pass reads the inputs again, and holds no more.
    budget = str(3 * 16 * SHAPE["hidden_size"] * 4)
    passes = ladder_peak_anon(root, recipes[LAYERS[1]], "--context", "16", "--batch", "1",
                              "--memory-budget", budget)
    report = json.loads((root / f"{recipes[LAYERS[1]].stem}.json").read_text())
    assert report["passes"] >= 3 and report["hidden_state_bytes"] <= int(budget)
    assert passes - shallow < bound, (
        f"peak RssAnon {passes / mib:.0f} MiB in {report['passes']} passes, {shallow / mib:.0f} MiB with "
        f"{LAYERS[0]} layers in one: one layer's inputs are {bound / mib:.0f} MiB"
    )


#: Runs the ladder command in process, writing RssAnon at the moment the streamed
#: loop starts (imports, planning, tokenizer and windows done) to argv[1].
INSTRUMENTED = """
import sys
from pathlib import Path
from nearswap_mergekit.ladder import layers
from nearswap_mergekit.cli import main

def anon():
    status = Path('/proc/self/status').read_text()
    return next(int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith('RssAnon:'))

streamed = layers.run
def run(*args, **kwargs):
    Path(sys.argv[1]).write_text(str(anon()))
    return streamed(*args, **kwargs)
layers.run = run
main(sys.argv[2:], prog_name='nearswap-mergekit')
"""

FORMULA_CONTEXT, FORMULA_BATCH = 128, 2


def formula_bytes(spec: TinyLlama, rows: int, hidden_state_bytes: int, vocab: int = 320) -> dict:
    """The ladder's documented need above its start, term by term (float32 rows)."""
    shapes = llama_tensor_shapes(_llama_config(spec, vocab_size=vocab))
    layer = sum(math.prod(shape) for name, shape in shapes.items() if name.startswith("model.layers.0."))
    positions = FORMULA_BATCH * FORMULA_CONTEXT
    return {
        "one layer's inputs": layer_input_bytes(spec),
        "every row's merged layer": rows * layer * 4,
        "one pass's hidden states": hidden_state_bytes,
        # One row's forward through a layer at a time: its MLP's three intermediate
        # tensors, a few hidden-sized ones and the attention scores; then the head's
        # logits and log-probabilities for every row (the base row's kept for the rest).
        "one batch's activations": positions * (3 * spec.intermediate_size + 6 * spec.hidden_size) * 4
        + FORMULA_BATCH * spec.num_attention_heads * FORMULA_CONTEXT**2 * 4,
        "one batch's log-probabilities": 2 * rows * positions * vocab * 4,
    }


def instrumented_peak(root: Path, recipe: Path, *extra: str) -> tuple:
    """(peak RssAnon, RssAnon when scoring started, the JSON report) of one ladder."""
    mark = root / f"{recipe.stem}-start.txt"
    json_path = root / f"{recipe.stem}-formula.json"
    args = [sys.executable, "-c", INSTRUMENTED, str(mark), "ladder", str(recipe), "--text", "long.txt",
            "--quiet", "--context", str(FORMULA_CONTEXT), "--batch", str(FORMULA_BATCH), "--json",
            str(json_path), *extra]
    for t in TS:
        args += ["--t", t]
    peak = polled_peak_anon(args, root)
    return peak, int(mark.read_text()), json.loads(json_path.read_text())


@pytest.mark.parametrize("budget", [None, "small"], ids=["one pass", "several passes"])
def test_peak_memory_is_within_the_formula(families, budget):
    """Peak RssAnon above the start of scoring <= the formula's sum, on a text of 40
    windows whose hidden states (3 rows x 40 x 128 x 1024 float32, 63 MB) weigh as
    much as one layer's inputs; with a budget of a third of them, in several passes,
    each pass's hidden states count, not all windows'."""
    root, recipes = families
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc/PID/status RssAnon")
    (root / "long.txt").write_text(TEXT * 45, encoding="utf-8")
    rows = 1 + len(TS)
    extra = ()
    if budget == "small":
        extra = ("--memory-budget", str(rows * 14 * FORMULA_CONTEXT * SHAPE["hidden_size"] * 4))
    peak, start, report = instrumented_peak(root, recipes[LAYERS[1]], *extra)
    assert report["path"] == "layers" and report["batches"] >= 20
    assert report["passes"] >= (3 if budget else 1)
    terms = formula_bytes(TinyLlama(num_hidden_layers=LAYERS[1], **SHAPE), rows, report["hidden_state_bytes"])
    mib = 2**20
    described = ", ".join(f"{name} {value / mib:.0f}" for name, value in terms.items())
    assert peak - start <= sum(terms.values()), (
        f"peak RssAnon {peak / mib:.0f} MiB, {(peak - start) / mib:.0f} MiB above the start of scoring "
        f"({start / mib:.0f} MiB); the formula allows {sum(terms.values()) / mib:.0f} MiB ({described})"
    )
