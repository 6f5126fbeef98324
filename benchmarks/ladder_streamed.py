"""The streamed ladder against today's whole-model engine and the naive route, each
from a cold disk under a memory limit smaller than the inputs, side by side in one run.

    sudo .venv/bin/python benchmarks/ladder_streamed.py   # writes benchmarks/results/ladder_streamed.{json,md}

Four bf16 checkpoints (`--hidden`, `--intermediate`, `--layers`; vocabulary 320), the
base and six rungs at the QuartetAnemoi card's t, `--windows` windows of `--context`
positions cut from COPYING, `--batch 1`, float32 on the CPU:
- streamed: `nearswap-mergekit ladder` (layer by layer, one read of the inputs per pass);
- whole model: the same with `--whole-model` (the inputs read once per batch: 4 times);
- naive: per rung the stock `mergekit-yaml` writes the merge, transformers loads it,
  `scoring.score_model` scores it (the base row loads the base).
Before each, the page cache is dropped; each runs in a memory cgroup of `--limit-gib`.
Bytes read from the device come from each process's /proc/self/io, start-up excluded
(it reads Python's and torch's files). The forward passes are the naive route's, timed
one by one (the same 28 forwards: same shapes, dtype and tokens); one read of the
inputs is timed alone (raw_read_gb_s). Goal: the streamed ladder within 1.15x of one
read + the forwards, and reads <= 1.2x the inputs.

Then 4 x 70B at 10^5 and 10^6 tokens: passes, RAM and hours on this machine and on one
GPU, from the rates measured here (each number marked measured or extrapolated).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List

import click

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import (GIB, NVME_READ_GB_S, SEVENTY_B_GB, MemoryCgroup, check_cgroups,  # noqa: E402
                     drop_page_cache, folders, goal_rows, goal_table, input_bytes, machine, write_json,
                     write_markdown, write_results)
from ladder import (CARD_TS, GPU_BF16_FLOPS, GPU_FLOP_SHARE, SEVENTY_B, child_command,  # noqa: E402
                    forward_flops, naive_command, raw_read_gb_s, shape_of, text_of_tokens, watched,
                    with_positions, write_recipe)

from nearswap_mergekit.tiny import QUARTET, TinyLlama, build_family  # noqa: E402

ROWS = 1 + len(CARD_TS)


def checkpoints(work: Path, hidden: int, intermediate: int, layers: int) -> Dict[str, str]:
    import torch

    spec = TinyLlama(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                     dtype=torch.bfloat16)
    models = work / f"streamed-{hidden}h-{intermediate}i-{layers}L"
    if not all((models / name / "model.safetensors").exists() for name in QUARTET):
        click.echo(f"generating four checkpoints in {models}")
        build_family(models, QUARTET, spec)
    return {name: str(models / name) for name in QUARTET}


# The defaults: 4 x 0.93 GB of input, more than the 3 GiB limit, which holds the naive
# route's float32 model (1.9 GB) and the ladders' needs with room for page cache.


def ladder_run(recipe: Path, text: Path, context: int, work: Path, whole_model: bool, cgroup, timeout):
    name = "whole-model" if whole_model else "streamed"
    json_path, report_path = work / f"{name}.json", work / f"{name}-report.json"
    args = ["ladder", str(recipe), "--text", str(text), "--context", str(context), "--batch", "1",
            "--quiet", "--json", str(json_path)]
    for t in CARD_TS:
        args += ["--t", repr(t)]
    if whole_model:
        args.append("--whole-model")
    run = watched(child_command("ladder_child", time.time(), report_path, *args), report_path, cgroup, timeout)
    run.pop("stdout")
    result = json.loads(json_path.read_text())
    run["json"] = {k: v for k, v in result.items() if k != "rungs"}
    run["nll"] = {r["label"]: r["texts"][0]["nll"] for r in result["rungs"]}
    return run


def contender(name: str, work: Path, limit: int, go) -> Dict:
    click.echo(f"  {name}")
    cache = drop_page_cache(work)
    cgroup = MemoryCgroup(limit)
    try:
        run = go(cgroup)
        run.update({"cache": cache, "max_usage_bytes": cgroup.max_usage(),
                    "oom_kills": cgroup.oom_kills()})
    finally:
        cgroup.remove()
    click.echo(f"    {run['wall_s']:.1f} s")
    return run


def contenders_in_turn(report: Dict, results: Path, work: Path, limit: int, runs) -> None:
    """Each contender run, the report so far written after each (a long run that
    fails late keeps what it measured)."""
    for key, name, go in runs:
        report[key] = contender(name, work, limit, go)
        write_json(results / "ladder_streamed.partial.json", report)


def device_reads(run: Dict) -> int:
    return sum(p["read_bytes"] for name, p in run["phases"].items() if name != "start-up")


def summarize(report: Dict) -> Dict:
    inputs = report["input_bytes"]
    naive = report["naive"]
    forwards = sum(r["forward_s"] for r in naive["rungs"])
    one_read = inputs / 1e9 / report["raw_read_gb_s"]
    out = {"forward_s": forwards, "one_read_s": one_read, "one_read_plus_forwards_s": forwards + one_read}
    for key in ("streamed", "whole_model"):
        run = report[key]
        phases = run["phases"]
        out[key] = {
            "wall_s": run["wall_s"],
            "run_s": phases["read + merge + forward"]["s"],
            "device_read_over_inputs": device_reads(run) / inputs,
            "device_read_per_pass": device_reads(run) / inputs / run["json"].get("passes", 1),
            "bytes_read_over_inputs": run["json"]["bytes_read"] / inputs,
            "forward_share": forwards / phases["read + merge + forward"]["s"],
            "over_one_read_plus_forwards": phases["read + merge + forward"]["s"] / (forwards + one_read),
            "nll_relative_difference": max(abs(run["nll"][label] - row["nll"]) / abs(row["nll"])
                                           for label, row in zip(run["nll"], naive["rungs"])),
            "peak_anon_bytes": max(run["peak_anon_bytes"].values()),
        }
    naive_rows = naive["phases"]
    out["naive"] = {
        "wall_s": naive["wall_s"],
        "device_read_over_inputs": device_reads(naive) / inputs,
        "forward_share": forwards / naive_rows["rungs"]["s"],
        "peak_anon_bytes": max(naive["peak_anon_bytes"].values()),
    }
    return out


def estimate_70b(report: Dict) -> List[Dict]:
    """Passes, RAM and hours for 4 x 70B (base + 6 rungs, windows of 2,048), from the rates
    measured here: forward FLOP/s, the streamed loop's time outside its forwards per byte
    of input, this disk's raw read rate."""
    s = report["summary"]
    shape = report["shape"]
    tokens_per_window = report["context"]
    measured_flops = report["windows"] * ROWS * forward_flops(shape, tokens_per_window)
    flop_rate = measured_flops / s["forward_s"]  # measured
    outside = s["streamed"]["run_s"] - s["forward_s"]  # measured: reading and merging all rows
    merge_s_per_byte = max(outside, 0.0) / report["input_bytes"]
    inputs = 4 * SEVENTY_B_GB * 1e9
    layer = (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    merged_layer = ROWS * layer * 4
    rows = []
    for tokens in (10**5, 10**6):
        windows = math.ceil(tokens / 2048)
        flops = windows * ROWS * forward_flops(SEVENTY_B, 2048)
        hidden = ROWS * windows * 2048 * 8192 * 4
        for where, budget in (("CPU", 96 * GIB), ("GPU", 40 * GIB)):
            passes = math.ceil(hidden / budget)
            if where == "CPU":
                read = passes * max(inputs * merge_s_per_byte, inputs / 1e9 / report["raw_read_gb_s"])
                forward = flops / flop_rate
            else:
                read = passes * inputs / 1e9 / NVME_READ_GB_S
                forward = flops / (GPU_BF16_FLOPS * GPU_FLOP_SHARE)
            rows.append({"tokens": tokens, "where": where, "passes": passes, "hidden_gib": hidden / GIB,
                         "ram_gib": (min(hidden, budget) + merged_layer + 4 * layer * 2) / GIB,
                         "read_merge_h": read / 3600, "forward_h": forward / 3600,
                         "total_h": (read + forward) / 3600})
    return rows


def cache_note(streamed: Dict) -> List[str]:
    """A line where the device gave less than the ladder asked of the files: the rest
    came from the page cache, so that run's device reads understate a cold read."""
    if streamed["device_read_over_inputs"] >= 0.95 * streamed["bytes_read_over_inputs"]:
        return []
    return ["", f"The streamed ladder asked {streamed['bytes_read_over_inputs']:.2f}x the inputs of the files and the "
            f"device gave {streamed['device_read_over_inputs']:.2f}x: the rest came from the page cache, although it "
            "was dropped before the run, so this run's device reads understate a cold read."]


def markdown(report: Dict) -> str:
    s, shape = report["summary"], report["shape"]
    gb = report["input_bytes"] / 1e9
    lines = [
        f"Measured {report['date']} on {report['machine']}; benchmark wall time "
        f"{report['benchmark_s'] / 60:.1f} min; load average (1 min) {report['load'][0]:.1f} before, "
        f"{report['load'][1]:.1f} after.",
        "",
        f"Four bf16 checkpoints (hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['layers']} "
        f"layers, vocabulary {shape['vocab']}; {gb:.2f} GB of input), the base and {len(CARD_TS)} rungs, "
        f"{report['windows']} windows of {report['context']:,} positions (COPYING), `--batch 1`, float32 "
        f"on the CPU; each contender from a cold disk (page cache dropped) in a memory cgroup of "
        f"{report['limit_bytes'] / GIB:g} GiB (the inputs are {report['input_bytes'] / GIB:.2f} GiB). "
        f"One read of the inputs alone: {s['one_read_s']:.1f} s ({report['raw_read_gb_s']:.2f} GB/s); the "
        f"{report['windows'] * ROWS} forwards, timed one by one in the naive route: {s['forward_s']:.1f} s.",
        "",
        "| | streamed ladder | whole-model ladder | naive route |",
        "|---|---:|---:|---:|",
        f"| wall, s | {s['streamed']['wall_s']:.1f} | {s['whole_model']['wall_s']:.1f} | "
        f"{s['naive']['wall_s']:.1f} |",
        f"| read + merge + forward, s | {s['streamed']['run_s']:.1f} | {s['whole_model']['run_s']:.1f} | |",
        f"| read from the device (start-up excluded) / inputs | "
        f"{s['streamed']['device_read_over_inputs']:.2f} | {s['whole_model']['device_read_over_inputs']:.2f} | "
        f"{s['naive']['device_read_over_inputs']:.2f} |",
        f"| passes or batches reading the inputs | {report['streamed']['json']['passes']} | "
        f"{report['whole_model']['json']['batches']} | {len(CARD_TS)} merges |",
        f"| forwards' share of the run | {s['streamed']['forward_share']:.0%} | "
        f"{s['whole_model']['forward_share']:.0%} | {s['naive']['forward_share']:.0%} |",
        f"| run / (one read + forwards) | {s['streamed']['over_one_read_plus_forwards']:.2f} | "
        f"{s['whole_model']['over_one_read_plus_forwards']:.2f} | |",
        f"| peak anonymous memory, GiB | {s['streamed']['peak_anon_bytes'] / GIB:.2f} | "
        f"{s['whole_model']['peak_anon_bytes'] / GIB:.2f} | {s['naive']['peak_anon_bytes'] / GIB:.2f} |",
        f"| NLL, largest relative difference from the naive route | "
        f"{s['streamed']['nll_relative_difference']:.1e} | {s['whole_model']['nll_relative_difference']:.1e} | |",
        "",
        *goal_table(report["goals"], ".3g"),
        *cache_note(s["streamed"]),
        "",
        "**4 x 70B** (Llama-2-70B shapes, 552 GB of bf16 input, base + 6 rungs, windows of 2,048), "
        "extrapolated from the rates measured above: this machine's forward FLOP/s and its streamed "
        "read + merge time per byte of input (or this disk's raw read rate, the slower); on one GPU, "
        f"{GPU_FLOP_SHARE:.0%} of an H100's published {GPU_BF16_FLOPS / 1e12:.0f} bf16 TFLOP/s and the "
        f"inputs from an NVMe drive at {NVME_READ_GB_S} GB/s (not measured: no GPU was lent). Budgets: "
        "96 GiB of RAM for hidden states on the CPU, 40 GiB of GPU memory on the GPU.",
        "",
        "| tokens | where | passes | hidden states, GiB | RAM or GPU memory, GiB | read + merge, h | "
        "forward, h | total, h |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["estimate_70b"]:
        lines.append(f"| {r['tokens']:,} | {r['where']} | {r['passes']} | {r['hidden_gib']:.0f} | "
                     f"{r['ram_gib']:.0f} | {r['read_merge_h']:.2f} | {r['forward_h']:.2f} | "
                     f"{r['total_h']:.1f} |")
    lines += ["", "Every number in this table is extrapolated (marked so); those above it are measured."]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--hidden", default=1024, show_default=True)
@click.option("--intermediate", default=2816, show_default=True)
@click.option("--layers", default=40, show_default=True)
@click.option("--windows", default=4, show_default=True, help="Windows scored, one per batch.")
@click.option("--context", default=2048, show_default=True, help="Positions per window.")
@click.option("--limit-gib", default=3.0, show_default=True, help="Each contender's memory limit.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds before a contender counts as hung.")
@click.option("--work", default=str(HERE / "work"), show_default=True, type=click.Path())
@click.option("--results", default=str(HERE / "results"), show_default=True, type=click.Path())
def main(hidden, intermediate, layers, windows, context, limit_gib, timeout, work, results):
    """The streamed ladder, the whole-model ladder and the naive route from a cold disk."""
    import os

    started = time.perf_counter()
    check_cgroups()
    # glibc keeps freed blocks below its mmap threshold, which rises to 32 MiB with
    # each larger block freed: above every tensor of these small shapes (a 70B's are
    # mostly larger), so anonymous memory grew with the number of allocations (2.4 GB
    # after the streamed ladder at 2,048 positions, killed for memory at 512). A fixed
    # threshold, for every contender alike, keeps memory to what each holds, as at 70B.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    work, results = Path(work).resolve(), Path(results).resolve()
    folders(work, results)
    paths = checkpoints(work, hidden, intermediate, layers)
    paths = with_positions(paths, work / f"streamed-positions-{context}", context)
    inputs = input_bytes(paths)
    limit = int(limit_gib * GIB)
    if limit >= inputs:
        raise click.UsageError(f"--limit-gib {limit_gib} is not below the inputs ({inputs / GIB:.2f} GiB)")
    text = work / "streamed-text.txt"
    # BOS + context - 1 tokens per window.
    text_of_tokens(paths[QUARTET[0]], windows * (context - 1), text)
    recipe = write_recipe(paths, CARD_TS[0], work / "streamed-recipe.yml")
    report: Dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "shape": shape_of(paths[QUARTET[0]]),
                    "input_bytes": inputs, "limit_bytes": limit, "windows": windows, "context": context,
                    "ts": list(CARD_TS), "load": [os.getloadavg()[0]]}
    click.echo("  raw read of the inputs")
    report["raw_read_gb_s"] = raw_read_gb_s(paths, work)
    naive_report = work / "streamed-naive-report.json"

    def naive(cgroup):
        run = watched(naive_command(paths, text, CARD_TS, context, work, naive_report), naive_report, cgroup,
                      timeout)
        run.pop("stdout")
        return run

    contenders_in_turn(report, results, work, limit, [
        ("streamed", "streamed ladder", lambda cg: ladder_run(recipe, text, context, work, False, cg, timeout)),
        ("whole_model", "whole-model ladder",
         lambda cg: ladder_run(recipe, text, context, work, True, cg, timeout)),
        ("naive", "naive route", naive),
    ])
    shutil.rmtree(work / "naive-out", ignore_errors=True)
    report["load"].append(os.getloadavg()[0])
    report["summary"] = summarize(report)
    s = report["summary"]["streamed"]
    report["goals"] = goal_rows([
        ("streamed: run / (one read of the inputs + the forwards) <= 1.15", s["over_one_read_plus_forwards"],
         1.15, False),
        ("streamed: read from the device per pass / inputs <= 1.2", s["device_read_per_pass"], 1.2, False),
        ("streamed: NLL relative difference from the naive route <= 1e-6", s["nll_relative_difference"],
         1e-6, False),
    ])
    report["estimate_70b"] = estimate_70b(report)
    report["benchmark_s"] = time.perf_counter() - started
    write_results(results, "ladder_streamed", report, markdown(report))


if __name__ == "__main__":
    main()
