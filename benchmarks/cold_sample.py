"""`stats --sample` from a cold page cache: what it reads from the disk, and how fast
its read pass is against `--sample 1`.

    .venv/bin/python benchmarks/cold_sample.py   # writes benchmarks/results/cold_sample.{json,md}

Four bf16 checkpoints of Llama-2-70B's tensor shapes (hidden 8192, MLP 28672, 64
heads, 8 KV heads, vocabulary 32000, one layer: 11 GB together) are generated once
under benchmarks/work/cold/ and reused. The chain recipe has no `tokenizer:`, so
that every tensor is sampled (vocabulary-aligned embeddings are read whole). For
--sample 1 and --sample 0.01, alternating, with the page cache dropped before
each run, `nearswap-mergekit stats` runs in a child process that reports its own
/proc/self/io at exit; the inputs' pages left in the page cache afterwards
(fincore) say how much of the checkpoints themselves was read. Then, in this
process, the sampled rows of the base checkpoint are read four ways from a cold
cache: through safetensors' mapping (as stats read them before), the mapping
after madvise(MADV_RANDOM), pread per run, and stats' reader (pread per run after
posix_fadvise(WILLNEED) for the runs of a block).
Needs root (or drop_caches rights) for a cold start-up; otherwise only the
checkpoints are evicted, with posix_fadvise(DONTNEED).
"""

from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import torch
import yaml
from harness import (HERE, checkpoint_files, drop_page_cache, folders, machine, offline_env,
                     read_bytes, recipes, run_child, write_json, write_markdown)
from safetensors import safe_open
from safetensors.torch import save_file

from nearswap_mergekit.plan import sampling
from nearswap_mergekit.plan.reader import SafetensorsRows, safetensors_header
from nearswap_mergekit.tiny import (QUARTET, TinyLlama, _llama_config, base_tensor,
                                    llama_tensor_shapes, secondary_tensor)

SPEC = TinyLlama(hidden_size=8192, intermediate_size=28672, num_hidden_layers=1,
                 num_attention_heads=64, num_key_value_heads=8, dtype=torch.bfloat16)
VOCAB = 32000
#: Checkpoints are written in shards of about this size, as large models ship.
SHARD_BYTES = 600 << 20
SAMPLES = (1.0, 0.01)
GOAL_READ_SHARE, GOAL_SPEED_UP = 0.10, 10.0

# Runs the CLI in this child process and writes its /proc/self/io at exit: the
# bytes it made the device read, start-up included, every thread included.
CHILD = (
    "import atexit, json, os, sys\n"
    "def report():\n"
    "    with open('/proc/self/io') as io:\n"
    "        fields = dict(line.split(': ') for line in io.read().splitlines())\n"
    "    with open(os.environ['COLD_SAMPLE_IO'], 'w') as out:\n"
    "        json.dump({key: int(value) for key, value in fields.items()}, out)\n"
    "atexit.register(report)\n"
    "sys.argv[0] = 'nearswap-mergekit'\n"
    "from nearswap_mergekit.cli import main\n"
    "main()\n"
)


def shard_groups(shapes: dict) -> list:
    """Tensor names in file order, cut into shards of about SHARD_BYTES."""
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = SPEC.dtype.itemsize * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def make_checkpoints(work: Path) -> dict:
    """The four checkpoints (base and secondaries as nearswap_mergekit.tiny makes
    them), written shard by shard so that one shard of each is in memory at once."""
    models = work / f"models-{SPEC.hidden_size}h-{SPEC.num_hidden_layers}L-v{VOCAB}"
    paths = {name: models / name for name in QUARTET}
    if (models / "complete").exists():
        return paths
    click.echo(f"generating four checkpoints in {models}")
    config = _llama_config(SPEC, VOCAB)
    shapes = llama_tensor_shapes(config)
    groups = shard_groups(shapes)
    weight_map = {}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for number, group in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        base = {name: base_tensor(name, shapes[name], SPEC) for name in group}
        for index, (model, path) in enumerate(paths.items()):
            tensors = base if index == 0 else {
                name: secondary_tensor(tensor, name, model, SPEC) for name, tensor in base.items()}
            save_file(tensors, str(path / file), metadata={"format": "pt"})
            del tensors
        weight_map.update(dict.fromkeys(group, file))
        click.echo(f"  shard {number}/{len(groups)}")
    total = sum(SPEC.dtype.itemsize * torch.Size(shape).numel() for shape in shapes.values())
    for path in paths.values():
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (models / "complete").write_text("")
    return paths


def cached_bytes(files: list) -> int:
    """Bytes of these files now in the page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          *map(str, files)], capture_output=True, text=True, check=True).stdout
    return sum(int(line) for line in out.split())


def disk_of(folder: Path) -> str:
    """The block device under folder, in lsblk's words, and its readahead window."""
    source = subprocess.run(["df", "--output=source", str(folder)], capture_output=True,
                            text=True).stdout.split()[-1]
    device = Path(source).name
    described = subprocess.run(["lsblk", "-dno", "NAME,SIZE,ROTA,TYPE,MODEL", source],
                               capture_output=True, text=True).stdout.split()
    readahead = Path(f"/sys/block/{device}/queue/read_ahead_kb")
    vendor = Path(f"/sys/block/{device}/device/vendor")
    words = " ".join(described) or source
    if vendor.exists() and vendor.read_text().strip() == "0x1af4":
        words += " (virtio block device)"
    if readahead.exists():
        words += f", readahead {int(readahead.read_text()) // 1024} MiB"
    return words


def run_stats(recipe: Path, sample: float, work: Path, files: list) -> dict:
    """One cold run of `stats` in a child process: its I/O, times and report."""
    report, io = work / f"stats-{sample:g}.json", work / f"stats-{sample:g}.io.json"
    cache = drop_page_cache(work)
    command = [sys.executable, "-c", CHILD, "stats", str(recipe), "--sample", f"{sample:g}",
               "--json", str(report), "--quiet"]
    _, wall = run_child(command, f"stats --sample {sample:g}", env=offline_env(COLD_SAMPLE_IO=str(io)))
    counters, measured = json.loads(io.read_text()), json.loads(report.read_text())
    stage = measured["results"][0]["stages"][0]
    return {
        "sample": sample,
        "cache": cache,
        "wall_s": wall,
        "read_seconds": measured["read_seconds"],
        "read_bytes": counters["read_bytes"],
        "inputs_cached_bytes": cached_bytes(files),
        "stage1_full_swap_fraction": stage["full_swap_fraction"],
        "stage1_full_swap_fraction_se": stage["full_swap_fraction_se"],
    }


def _madvise_random(tensor: torch.Tensor) -> None:
    """madvise(MADV_RANDOM) on the pages of a mapped tensor."""
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(start, length, mmap.MADV_RANDOM):
        raise OSError(ctypes.get_errno(), "madvise(MADV_RANDOM) failed")


def read_ways(base: Path, work: Path, sample: float) -> dict:
    """The sampled rows of every tensor of the base checkpoint, read from a cold
    cache four ways: device bytes read and seconds of each."""
    targets = []  # (file, tensor name, reader, rows drawn, runs as (first row, rows))
    for shard in sorted(base.glob("*.safetensors")):
        for name in safetensors_header(str(shard)):
            rows = SafetensorsRows(str(shard), name)
            drawn = sampling.sample_rows(name, rows.rows, rows.row_len, sample)
            runs = [(c * drawn.cluster_rows, min(drawn.cluster_rows, drawn.rows - c * drawn.cluster_rows))
                    for c in drawn.chosen]
            index = torch.cat([torch.arange(first, first + count) for first, count in runs])
            targets.append((shard, name, rows, index, runs))
    wanted = sum(len(index) * rows.row_bytes for _, _, rows, index, _ in targets)

    def mapped(advise: bool):
        files = {shard: safe_open(str(shard), framework="pt") for shard, *_ in targets}
        for shard, name, rows, index, _ in targets:
            matrix = files[shard].get_tensor(name).reshape(rows.rows, rows.row_len)
            if advise:
                _madvise_random(matrix)
            matrix.index_select(0, index)
            del matrix
        files.clear()  # unmapped: the next drop can evict the pages

    def pread_runs():
        for shard, _, rows, index, runs in targets:
            view, position = memoryview(bytearray(rows.row_bytes * len(index))), 0
            with open(shard, "rb", buffering=0) as file:
                for first, count in runs:
                    length = count * rows.row_bytes
                    os.preadv(file.fileno(), [view[position : position + length]],
                              rows.span.start + first * rows.row_bytes)
                    position += length

    def reader():
        for _, _, rows, index, _ in targets:
            rows.read_rows(index, torch.empty(len(index), rows.row_len, dtype=rows.dtype))

    ways = {
        "safetensors mapping (stats before)": lambda: mapped(False),
        "mapping + madvise(MADV_RANDOM)": lambda: mapped(True),
        "pread per run": pread_runs,
        "stats' reader: pread per run after fadvise(WILLNEED)": reader,
    }
    _, _, rows, index, _ = targets[0]
    # Anything a way loads on first use (numpy, for one) is loaded now, not counted.
    rows.read_rows(index[:1], torch.empty(1, rows.row_len, dtype=rows.dtype))
    results = {"wanted_bytes": wanted,
               "checkpoint_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors"))}
    for label, way in ways.items():
        gc.collect()
        drop_page_cache(work)
        before, start = read_bytes(), time.perf_counter()
        way()
        results[label] = {"seconds": time.perf_counter() - start, "read_bytes": read_bytes() - before}
        click.echo(f"  {label}: {results[label]['read_bytes'] / 2**20:.1f} MiB, "
                   f"{results[label]['seconds']:.2f} s")
    return results


def summary(runs: list, input_bytes: int) -> dict:
    """Medians per --sample, and each repeat's pair (run back to back, alternated)."""
    by = {sample: [r for r in runs if r["sample"] == sample] for sample in SAMPLES}
    median = {sample: {key: statistics.median(r[key] for r in rs)
                       for key in ("wall_s", "read_seconds", "read_bytes", "inputs_cached_bytes")}
              for sample, rs in by.items()}
    sampled, whole = median[0.01], median[1.0]
    paired = [w["read_seconds"] / s["read_seconds"] for w, s in zip(by[1.0], by[0.01])]
    return {
        "median": {f"{sample:g}": values for sample, values in median.items()},
        "read_share": sampled["read_bytes"] / input_bytes,
        "inputs_cached_share": sampled["inputs_cached_bytes"] / input_bytes,
        "worst_read_share": max(r["read_bytes"] for r in by[0.01]) / input_bytes,
        "read_pass_speed_up": whole["read_seconds"] / sampled["read_seconds"],
        "paired_speed_ups": paired,
        "worst_paired_speed_up": min(paired),
    }


def markdown(report: dict) -> str:
    s, gb = report["summary"], report["input_bytes"] / 1e9
    lines = [
        "# `stats --sample` from a cold page cache",
        "",
        f"{report['date']}; {report['machine']}; disk: {report['disk']}.",
        f"Inputs: four bf16 checkpoints of Llama-2-70B tensor shapes (one layer, vocabulary "
        f"{VOCAB}), {gb:.2f} GB in {report['shards']} shards; the chain recipe of "
        "benchmarks/run.py (no `tokenizer:`). Page cache dropped before each run "
        f"({report['runs'][0]['cache']}); --sample 1 and 0.01 alternated, {report['repeats']} "
        "runs each.",
        "",
        f"**Shared machine**: other processes use the same {os.cpu_count()} cores and the same "
        f"disk at the same time (load average {report['load_before']:.1f} before, "
        f"{report['load_after']:.1f} after); times vary from run to run with their load.",
        "",
        "| run | --sample | read pass (read_seconds) | wall | device bytes read by the process | "
        "inputs in page cache after |",
        "|---|---|---|---|---|---|",
    ]
    for number, run in enumerate(report["runs"], 1):
        lines.append(
            f"| {number} | {run['sample']:g} | {run['read_seconds']:.2f} s | {run['wall_s']:.1f} s | "
            f"{run['read_bytes'] / 1e9:.3f} GB ({100 * run['read_bytes'] / report['input_bytes']:.1f} %) | "
            f"{run['inputs_cached_bytes'] / 1e9:.3f} GB |")
    lines += [
        "",
        "The process's bytes include its start-up from a cold cache (Python, torch, mergekit); "
        "the inputs' pages in the page cache after the run are what was read of the "
        "checkpoints themselves.",
        "",
        "| goal | measured (medians) | worst | met |",
        "|---|---|---|---|",
        f"| --sample 0.01 reads <= {100 * GOAL_READ_SHARE:.0f} % of the input bytes (the "
        f"process's read_bytes) | {100 * s['read_share']:.2f} % (the checkpoints' pages: "
        f"{100 * s['inputs_cached_share']:.2f} %) | {100 * s['worst_read_share']:.2f} % | "
        f"{'yes' if s['worst_read_share'] <= GOAL_READ_SHARE else 'no'} |",
        f"| read pass >= {GOAL_SPEED_UP:.0f}x faster than --sample 1 | "
        f"{s['read_pass_speed_up']:.1f}x | {s['worst_paired_speed_up']:.1f}x (pairs, run back "
        f"to back: {', '.join(f'{x:.1f}x' for x in s['paired_speed_ups'])}) | "
        f"{'yes' if s['worst_paired_speed_up'] >= GOAL_SPEED_UP else 'no'} |",
        "",
        f"Stage 1's full-swap fraction: {report['runs'][0]['stage1_full_swap_fraction']:.5f} exact; "
        + ", ".join(f"{r['stage1_full_swap_fraction']:.5f} ± {r['stage1_full_swap_fraction_se']:.5f}"
                    for r in report["runs"] if r["sample"] < 1)
        + " at --sample 0.01 (the same seed each run).",
    ]
    ways = report["read_ways"]
    lines += [
        "",
        "## Reading a sample's rows, four ways",
        "",
        f"The rows a 0.01 sample draws from each tensor of the base checkpoint "
        f"({ways['wanted_bytes'] / 2**20:.1f} MiB of {ways['checkpoint_bytes'] / 2**30:.2f} GiB), "
        "read in one process from a cold cache:",
        "",
        "| way | device bytes read | of the rows' bytes | seconds |",
        "|---|---|---|---|",
    ]
    for label, way in ways.items():
        if isinstance(way, dict):
            lines.append(f"| {label} | {way['read_bytes'] / 2**20:.1f} MiB | "
                         f"{way['read_bytes'] / ways['wanted_bytes']:.2f}x | {way['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--repeats", default=2, show_default=True, help="Runs of each --sample.")
@click.option("--work", default=str(HERE / "work" / "cold"), show_default=True, type=click.Path())
@click.option("--results", default=str(HERE / "results"), show_default=True, type=click.Path())
@click.option("--delete-checkpoints", is_flag=True, help="Delete the checkpoints when done.")
def main(repeats, work, results, delete_checkpoints):
    """Cold-cache runs of stats --sample 1 and 0.01; writes cold_sample.{json,md}."""
    if not shutil.which("fincore"):
        raise click.UsageError("fincore (util-linux) is needed: apt-get install util-linux")
    work, results = folders(work, results)
    paths = make_checkpoints(work)
    files = checkpoint_files(paths)
    recipe = work / "recipe.yml"
    (doc,) = recipes({name: str(path) for name, path in paths.items()})["a"]
    assert "tokenizer" not in doc
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "disk": disk_of(work),
              "repeats": repeats, "input_bytes": sum(f.stat().st_size for f in files),
              "shards": len(files), "load_before": os.getloadavg()[0], "runs": []}
    for repeat in range(repeats):
        for sample in SAMPLES:
            run = run_stats(recipe, sample, work, files)
            report["runs"].append(run)
            click.echo(f"  run {repeat + 1}/{repeats} --sample {sample:g}: read pass "
                       f"{run['read_seconds']:.2f} s, {run['read_bytes'] / 1e9:.2f} GB read")
    click.echo("reading the base's sampled rows four ways")
    report["read_ways"] = read_ways(paths[QUARTET[0]], work, 0.01)
    report["load_after"] = os.getloadavg()[0]
    report["summary"] = summary(report["runs"], report["input_bytes"])
    write_json(results / "cold_sample.json", report)
    write_markdown(results / "cold_sample.md", markdown(report))
    if delete_checkpoints:
        shutil.rmtree(Path(paths[QUARTET[0]]).parent)


if __name__ == "__main__":
    main()
