"""NearSwap benchmarks: the kernel on one 70B-shaped group, and end-to-end merges
through the stock mergekit CLIs, contenders alternated in one run.

    .venv/bin/python benchmarks/run.py            # writes benchmarks/results/latest.{json,md}

Checkpoints are generated once under benchmarks/work/ (four bf16 Llama-shaped
models, about 0.5B parameters each by default) and reused by later runs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import torch
import yaml
from harness import (BIN, HERE, NVME_READ_GB_S, NVME_WRITE_GB_S, QUARTET, RECOMMENDED_FLAGS,
                     SEVENTY_B_GB, T, drop_page_cache, folders, goal_rows, goal_table, input_bytes,
                     machine, make_checkpoints, offline_env, recipes, seconds, stock_nearswap_formula,
                     write_json)

from nearswap_mergekit import nearswap_chain

# The launcher reports the child's own rusage, so peak RSS is per run.
MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode\n"
    "wall = time.perf_counter() - start\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'code': code, 'wall_s': wall, 'cpu_s': usage.ru_utime + usage.ru_stime,"
    " 'peak_rss_mb': usage.ru_maxrss / 1024}))\n"
)


def kernel_benchmark(repeats: int, rows: int = 8192, cols: int = 28672):
    """One Llama-2-70B MLP group (8192 x 28672), four bf16 inputs, three stages."""
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
    secondaries = [
        (base.float() + torch.randn(rows, cols, generator=gen) * 0.01).to(torch.bfloat16)
        for _ in range(3)
    ]
    inputs = [base, *secondaries]
    input_gb = sum(x.numel() * x.element_size() for x in inputs) / 1e9
    out = torch.empty_like(base)

    def plain_copy():
        for x in inputs:
            out.copy_(x)

    contenders = {
        "nearswap_chain (fused)": lambda: nearswap_chain(base, secondaries, T, backend="fused"),
        "nearswap_chain (torch path)": lambda: nearswap_chain(base, secondaries, T, backend="torch"),
        "stock nearswap formula": lambda: stock_nearswap_formula(base, secondaries, T),
        "plain copy of the inputs": plain_copy,
    }
    times = {name: [] for name in contenders}
    for _ in range(repeats):  # alternate the contenders
        for name, fn in contenders.items():
            times[name].append(seconds(fn))
    return {
        "shape": [rows, cols],
        "input_gb": input_gb,
        "gb_per_s": {name: input_gb / statistics.median(ts) for name, ts in times.items()},
        "seconds": {name: statistics.median(ts) for name, ts in times.items()},
    }


CONTENDERS = {
    "a": "nearswap_chain, one pass",
    "a-flags": "nearswap_chain, one pass, --async-write --write-threads 2 --out-shard-size 1B",
    "b": "stock nearswap, 3 mergekit-multi stages, dtype float32",
    "c": "nearswap_chain, 3 mergekit-multi stages",
    "d": "reference: stock linear, weights 1, 0, 0, 0",
    "start": "floor, start-up: python -c 'import mergekit.merge'",
    "raw": "floor, I/O: read every input byte, write one output (safetensors, no mergekit)",
    "stats": "nearswap-mergekit stats of (a), --sample 1",
    "stats-0.01": "nearswap-mergekit stats of (a), --sample 0.01",
}


def command_for(key: str, plans: dict, work: Path, paths: dict) -> list:
    if key == "start":
        return [sys.executable, "-c", "import mergekit.merge"]
    if key == "raw":
        return [sys.executable, str(HERE / "raw_io.py"), str(work / "out-raw.safetensors"),
                *(paths[name] for name in QUARTET)]
    if key == "a-flags":
        return [*command_for("a", plans, work, paths), *RECOMMENDED_FLAGS]
    if key.startswith("stats"):
        sample = key.partition("-")[2] or "1"
        recipe = work / "recipe-a.yml"
        return [str(BIN / "nearswap-mergekit"), "stats", str(recipe), "--sample", sample, "--quiet",
                "--json", str(work / f"{key}.json")]
    docs = plans[key]
    recipe = work / f"recipe-{key}.yml"
    out = work / f"out-{key}"
    stages = work / f"stages-{key}"
    subprocess.run(["rm", "-rf", str(out), str(stages)], check=True)
    if len(docs) == 1:
        return [str(BIN / "mergekit-yaml"), str(recipe), str(out)]
    return [str(BIN / "mergekit-multi"), str(recipe), "-I", str(stages), "--out-path", str(out)]


def run_measured(key: str, command: list) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *command],
        capture_output=True, text=True, env=offline_env(),
    )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    if stats["code"]:
        raise click.ClickException(f"{key} failed:\n{result.stderr[-2000:]}")
    return stats


def end_to_end(paths: dict, work: Path, repeats: int) -> dict:
    plans = recipes(paths)
    for key, docs in plans.items():
        (work / f"recipe-{key}.yml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    keys = list(CONTENDERS)
    runs = {key: [] for key in keys}
    for repeat in range(repeats):
        order = keys[repeat % len(keys):] + keys[: repeat % len(keys)]
        for key in order:
            runs[key].append(run_measured(key, command_for(key, plans, work, paths)))
            if key.startswith("stats"):  # its own timing of the read pass, without start-up
                report = json.loads((work / f"{key}.json").read_text())
                runs[key][-1]["read_s"] = report["read_seconds"]
            click.echo(f"  run {repeat + 1}/{repeats} {key}: {runs[key][-1]['wall_s']:.1f} s")
    return {
        key: {
            "label": CONTENDERS[key],
            **{m: statistics.median(r[m] for r in rs) for m in ("wall_s", "cpu_s", "peak_rss_mb", "read_s")
               if m in rs[0]},
        }
        for key, rs in runs.items()
    }


def markdown(report: dict) -> str:
    k = report["kernel"]
    g = k["gb_per_s"]
    ours = g["nearswap_chain (fused)"]
    lines = [
        f"Measured {report['date']} on {report['machine']}.",
        "",
        f"**Kernel**: one {k['shape'][0]} x {k['shape'][1]} group, four bf16 inputs "
        f"({k['input_gb']:.2f} GB), three stages at t = {T}; median of {report['repeats']}.",
        "",
        "| contender | GB/s of input | ours vs it |",
        "|---|---:|---:|",
    ]
    for name, value in g.items():
        lines.append(f"| {name} | {value:.2f} | {ours / value:.2f}x |")
    e = report["end_to_end"]
    floor = e["start"]["wall_s"] + e["raw"]["wall_s"]
    lines += [
        "",
        f"**End to end**: four {report['params'] / 1e9:.2f}B-parameter bf16 checkpoints "
        f"({report['checkpoint_gb']:.2f} GB each), stock CLIs, page cache warm, median of "
        f"{report['repeats']}, contenders alternated. The floor is start-up (importing "
        f"mergekit.merge, {e['start']['wall_s']:.2f} s) plus the raw I/O pass "
        f"({e['raw']['wall_s']:.2f} s): {floor:.2f} s.",
        "",
        "| contender | wall s | CPU s | peak RSS MB | wall / floor | read pass s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in e.items():
        read = f"{row['read_s']:.2f}" if "read_s" in row else ""
        lines.append(
            f"| ({key}) {row['label']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
            f"{row['peak_rss_mb']:.0f} | {row['wall_s'] / floor:.2f}x | {read} |"
        )
    lines += ["", *goal_table(report["goals"], ".2f")]
    return "\n".join(lines) + "\n"


def goals(report: dict) -> list:
    g = report["kernel"]["gb_per_s"]
    e = report["end_to_end"]
    ours = g["nearswap_chain (fused)"]
    rows = [
        ("kernel: ours / stock formula >= 20", ours / g["stock nearswap formula"], 20, True),
        ("kernel: copy / ours <= 3", g["plain copy of the inputs"] / ours, 3, False),
        ("end to end: (a-flags) / floor (start-up + raw I/O) wall <= 1.15",
         e["a-flags"]["wall_s"] / (e["start"]["wall_s"] + e["raw"]["wall_s"]), 1.15, False),
        ("end to end: (b) / (a) wall >= 2.5", e["b"]["wall_s"] / e["a"]["wall_s"], 2.5, True),
        ("end to end: (a) / (d) peak RSS <= 1.05",
         e["a"]["peak_rss_mb"] / e["d"]["peak_rss_mb"], 1.05, False),
        ("stats --sample 1 / reference (d) wall <= 1.2", e["stats"]["wall_s"] / e["d"]["wall_s"], 1.2, False),
        ("stats: --sample 1 / --sample 0.01 wall >= 20",
         e["stats"]["wall_s"] / e["stats-0.01"]["wall_s"], 20, True),
        ("stats: --sample 1 / --sample 0.01 read pass (start-up excluded) >= 20",
         e["stats"]["read_s"] / e["stats-0.01"]["read_s"], 20, True),
    ]
    if "from_disk" in report:
        disk = report["from_disk"]
        rows += [
            ("from disk: (a-flags) / raw floor wall <= 1.15",
             disk["a-flags"]["wall_s"] / disk["raw"]["wall_s"], 1.15, False),
            ("from disk: (a-flags) / floor (cold start-up + raw I/O) wall <= 1.15",
             disk["a-flags"]["wall_s"] / (disk["start"]["wall_s"] + disk["raw"]["wall_s"]), 1.15, False),
            ("from disk: staged stock / (a-flags) wall >= 2", disk["staged"]["wall_s"] / disk["a-flags"]["wall_s"], 2, True),
        ]
    return goal_rows(rows)


def staged_stock_from_disk(paths: dict, work: Path) -> dict:
    """Stock nearswap as three mergekit-yaml stages with float32 intermediates, each
    stage's input deleted once the next stage has used it (as a user short of disk
    would); wall and CPU times summed, peak RSS the largest."""
    previous, total = paths[QUARTET[0]], {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mb": 0.0}
    for index, secondary in enumerate(QUARTET[1:], 1):
        doc = {"merge_method": "nearswap", "base_model": previous,
               "models": [{"model": paths[secondary]}], "parameters": {"t": T}, "dtype": "float32"}
        recipe, out = work / f"disk-stage{index}.yml", work / f"disk-stage{index}"
        recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
        subprocess.run(["rm", "-rf", str(out)], check=True)
        run = run_measured(f"stage {index}", [str(BIN / "mergekit-yaml"), str(recipe), str(out)])
        total = {"wall_s": total["wall_s"] + run["wall_s"], "cpu_s": total["cpu_s"] + run["cpu_s"],
                 "peak_rss_mb": max(total["peak_rss_mb"], run["peak_rss_mb"])}
        if index > 1:
            subprocess.run(["rm", "-rf", previous], check=True)
        previous = str(out)
    subprocess.run(["rm", "-rf", previous], check=True)
    return total


def from_disk(work: Path, params: float) -> dict:
    """Chain (recommended flags), staged stock and the raw floor, each after the page
    cache is dropped; GB/s of input."""
    paths = make_checkpoints(work, params)
    input_gb = input_bytes(paths) / 1e9
    plans = recipes(paths)
    (work / "recipe-a.yml").write_text(yaml.safe_dump_all(plans["a"], sort_keys=False))
    results = {"input_gb": input_gb}
    # start-up from a cold cache too: dropping the cache evicts Python's own files.
    for key in ("start", "raw", "a", "a-flags", "staged"):
        results["cache"] = drop_page_cache(work)
        if key == "staged":
            run = staged_stock_from_disk(paths, work)
        else:
            run = run_measured(key, command_for(key, plans, work, paths))
        run["gb_per_s"] = input_gb / run["wall_s"]
        results[key] = run
        click.echo(f"  from disk {key}: {run['wall_s']:.1f} s, {run['gb_per_s']:.2f} GB/s")
    for leftover in ("out-a", "out-raw.safetensors"):
        subprocess.run(["rm", "-rf", str(work / leftover)], check=True)
    return results


def estimates(report: dict) -> list:
    """Estimated wall time of configs/quartet.yml on 4 x 70B from the measured rates."""
    disk = report["from_disk"]
    e = report["end_to_end"]
    inputs = 4 * SEVENTY_B_GB
    warm_chain_gb_s = 4 * report["checkpoint_gb"] / max(e["a-flags"]["wall_s"] - e["start"]["wall_s"], 1e-9)
    warm_staged_gb_s = 4 * report["checkpoint_gb"] / max(e["b"]["wall_s"] - e["start"]["wall_s"], 1e-9)
    # bytes each plan reads and writes, 70B float16 inputs (float32 intermediates: 2x)
    chain_io = (inputs, SEVENTY_B_GB)
    staged_io = (2 * SEVENTY_B_GB + 2 * (3 * SEVENTY_B_GB), 3 * 2 * SEVENTY_B_GB)
    rows = []
    for label, key, io, warm, space in (
        ("one pass (nearswap_chain, recommended flags)", "a-flags", chain_io, warm_chain_gb_s,
         SEVENTY_B_GB),
        ("three stages (stock nearswap, float32 intermediates)", "staged", staged_io,
         warm_staged_gb_s, 2 * 2 * SEVENTY_B_GB),
    ):
        nvme_io = io[0] / NVME_READ_GB_S + io[1] / NVME_WRITE_GB_S
        rows.append({
            "plan": label,
            "this_disk_hours": inputs / disk[key]["gb_per_s"] / 3600,
            "nvme_hours": max(nvme_io, inputs / warm) / 3600,
            "disk_space_gb": space,
            "peak_rss_mb_measured": disk[key]["peak_rss_mb"],
        })
    return rows


def disk_markdown(report: dict) -> str:
    disk = report["from_disk"]
    lines = [
        "",
        f"**From disk**: four {report['disk_params'] / 1e9:.1f}B-parameter bf16 checkpoints "
        f"({disk['input_gb']:.1f} GB of input), page cache dropped ({disk['cache']}) before "
        "each contender, run once.",
        "",
        "| contender | wall s | GB/s of input | peak RSS MB | wall / raw I/O | wall / (start-up + raw I/O) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    floor = disk["start"]["wall_s"] + disk["raw"]["wall_s"]
    for key, label in (("start", CONTENDERS["start"]), ("raw", CONTENDERS["raw"]),
                       ("a", CONTENDERS["a"]), ("a-flags", CONTENDERS["a-flags"]),
                       ("staged", "stock nearswap, 3 mergekit-yaml stages, float32 intermediates")):
        row = disk[key]
        lines.append(f"| {label} | {row['wall_s']:.1f} | {row['gb_per_s']:.2f} | "
                     f"{row['peak_rss_mb']:.0f} | {row['wall_s'] / disk['raw']['wall_s']:.2f}x | "
                     f"{row['wall_s'] / floor:.2f}x |")
    lines += [
        "",
        f"**Estimated wall time of configs/quartet.yml on 4 x 70B** (float16, {SEVENTY_B_GB:.0f} GB "
        f"each): on this machine's disk, from the rates above; on an NVMe drive assumed to read "
        f"{NVME_READ_GB_S} GB/s and write {NVME_WRITE_GB_S} GB/s, the slower of its I/O time and "
        "this machine's warm-cache compute rate (1 GB scale).",
        "",
        "| plan | this disk, hours | NVMe, hours | disk space for outputs, GB | peak RSS measured, MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["estimates"]:
        lines.append(f"| {row['plan']} | {row['this_disk_hours']:.2f} | {row['nvme_hours']:.2f} | "
                     f"{row['disk_space_gb']:.0f} | {row['peak_rss_mb_measured']:.0f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--params", default=5e8, show_default=True, help="Parameters per checkpoint.")
@click.option("--disk-params", default=0.0, show_default=True,
              help="Also run from disk with checkpoints of this many parameters (1e9: 8 GB of input).")
@click.option("--repeats", default=3, show_default=True)
@click.option("--work", default=str(HERE / "work"), show_default=True, type=click.Path())
@click.option("--results", default=str(HERE / "results"), show_default=True, type=click.Path())
@click.option("--skip-kernel", is_flag=True)
def main(params, disk_params, repeats, work, results, skip_kernel):
    """Run the kernel and end-to-end benchmarks and write latest.json and latest.md."""
    work, results = folders(work, results)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "repeats": repeats,
              "params": params, "t": T}
    if not skip_kernel:
        click.echo("kernel benchmark")
        report["kernel"] = kernel_benchmark(repeats)
    paths = make_checkpoints(work, params)
    report["checkpoint_gb"] = (Path(paths["miqu"]) / "model.safetensors").stat().st_size / 1e9
    click.echo("end-to-end benchmark")
    report["end_to_end"] = end_to_end(paths, work, repeats)
    if disk_params:
        click.echo("from-disk benchmark")
        report["disk_params"] = disk_params
        report["from_disk"] = from_disk(work, disk_params)
        report["estimates"] = estimates(report)
    if not skip_kernel:
        report["goals"] = goals(report)
        text = markdown(report) + (disk_markdown(report) if disk_params else "")
        (results / "latest.md").write_text(text)
    write_json(results / "latest.json", report)
    click.echo((results / "latest.md").read_text() if not skip_kernel else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
