"""Where mergekit-yaml's time goes on the NearSwap chain: a py-spy profile of the
stock CLI merging the benchmark quartet with the recommended flags, main thread's
wall time (idle included) by what it is doing.

    .venv/bin/python benchmarks/profile_merge.py   # after benchmarks/run.py made the checkpoints

Writes benchmarks/results/profile.md. Needs py-spy (`pip install py-spy`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import BIN, RECOMMENDED_FLAGS, make_checkpoints, recipes, write_markdown  # noqa: E402

import yaml  # noqa: E402

RATE = 100  # samples per second: enough for shares of a few percent, small output

#: (what the main thread is doing, a frame text that shows it), first match wins.
CATEGORIES = [
    ("start-up: importing modules", "_find_and_load"),
    ("NearSwap kernel (this package)", "nearswap_mergekit/"),
    ("writing the output (safetensors)", "tensor_writer"),
    ("reading inputs (safetensors, mergekit loader)", "safetensors"),
    ("reading inputs (safetensors, mergekit loader)", "lazy_tensor_loader"),
    ("reading inputs (safetensors, mergekit loader)", "io/loader"),
    ("mergekit task graph and executor", "mergekit/graph.py"),
    ("mergekit planning", "mergekit/plan.py"),
    ("mergekit, other (config, architecture, tokenizer, card)", "mergekit/"),
]


def categorize(stack: str) -> str:
    for label, marker in CATEGORIES:
        if marker in stack:
            return label
    return "other (interpreter, torch, start and exit)"


def summarize(raw: Path) -> tuple:
    """Main-thread seconds per category, and the main thread's busiest leaf frames."""
    categories, leaves = Counter(), Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].endswith(": MainThread"):  # py-spy --threads names each thread first
            continue
        categories[categorize(stack)] += int(count)
        leaves[frames[-1]] += int(count)
    return categories, leaves


@click.command()
@click.option("--params", default=5e8, show_default=True, help="Parameters per checkpoint.")
@click.option("--work", default=str(HERE / "work"), show_default=True, type=click.Path())
@click.option("--results", default=str(HERE / "results"), show_default=True, type=click.Path())
def main(params, work, results):
    if shutil.which("py-spy") is None and not (BIN / "py-spy").exists():
        raise click.ClickException("py-spy is not installed: pip install py-spy")
    spy = str(BIN / "py-spy") if (BIN / "py-spy").exists() else "py-spy"
    work = Path(work).resolve()
    paths = make_checkpoints(work, params)
    recipe = work / "recipe-a.yml"
    recipe.write_text(yaml.safe_dump_all(recipes(paths)["a"], sort_keys=False))
    with tempfile.TemporaryDirectory() as scratch:
        raw, out = Path(scratch) / "profile.raw", Path(scratch) / "out"
        started = time.perf_counter()
        subprocess.run(
            [spy, "record", "--idle", "--threads", "-r", str(RATE), "-f", "raw", "-o", str(raw),
             "--", str(BIN / "mergekit-yaml"), str(recipe), str(out), *RECOMMENDED_FLAGS],
            check=True, capture_output=True, text=True,
        )
        wall = time.perf_counter() - started
        categories, leaves = summarize(raw)
    total = sum(categories.values())
    lines = [
        f"py-spy ({RATE} samples/s, idle included) of `mergekit-yaml recipe-a.yml OUT "
        f"{' '.join(RECOMMENDED_FLAGS)}` on the benchmark quartet "
        f"({params / 1e9:.1f}B parameters each); {wall:.1f} s wall under the profiler. "
        "The main thread's time by what it was doing:",
        "",
        "| main thread | seconds | share |",
        "|---|---:|---:|",
    ]
    for label, count in categories.most_common():
        lines.append(f"| {label} | {count / RATE:.2f} | {100 * count / total:.0f} % |")
    lines += ["", "Busiest frames (leaf), main thread:", "", "| frame | seconds |", "|---|---:|"]
    for frame, count in leaves.most_common(12):
        lines.append(f"| `{frame}` | {count / RATE:.2f} |")
    write_markdown(Path(results).resolve() / "profile.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
