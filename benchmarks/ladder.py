"""`nearswap-mergekit ladder` against the route a user has today, and from disk
under a memory limit smaller than its inputs.

    sudo .venv/bin/python benchmarks/ladder.py    # writes benchmarks/results/ladder.{json,md}
    .venv/bin/python benchmarks/ladder.py --skip-disk    # without root: the first part only

1. Side by side, page cache warm, on the 1 GB benchmark quartet that run.py builds
   (four bf16 checkpoints with Llama-2-7B layer shapes, 0.5B parameters each): the
   base and six rungs at the card's t, scored on one window of `--context` positions
   (BOS + context - 1 text tokens of COPYING), float32 on the CPU.
   - the ladder: one `nearswap-mergekit ladder --t ... --json` process;
   - the naive route: one Python process that, per rung, runs the stock `mergekit-yaml`
     in a subprocess (writing the merge; the recommended flags), loads the merge with
     transformers and scores it with `scoring.score_model`; the base row loads the base.
   Each is split into start-up, reading and merging (and writing and loading), and
   forward passes; the NLLs of the two routes are compared rung by rung.
2. From disk: the 8 GB quartet (run.py --disk-params 1e9), page cache dropped, the
   ladder (two rungs, a short text) in a memory cgroup whose limit is below the size
   of its inputs; bytes read from the device per phase (/proc/self/io) against the
   inputs, and peak anonymous memory (RssAnon, polled) beside the naive route's.
3. What a 4 x 70B ladder would cost, extrapolated from the measured rates.

How the time is split. Both contenders run in child processes started by this script,
which time their own phases: start-up is from the launch to the end of the imports;
for the naive route the mergekit-yaml child times its own imports (start-up) and its
`main()` (read + merge + write), and the scoring process times each load and each
`score_model` call (forward). The ladder's child runs the `ladder` command in-process
(`cli.main`) with a timer around `ladder.engine.run` (reading, merging and the forward passes,
in lockstep threads, inseparable from inside); the rest of the command is planning
(mergekit's planner, tokenizer, text). The full-swap counts are taken inside `ladder.run`'s
read + merge. The ladder's forward time is taken to be the naive route's measured forwards
(the same seven forwards: same shapes, dtype and tokens; the ladder runs them in seven
threads at once); its read + merge time is `ladder.run`'s time less that.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import click
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import (GIB, NVME_READ_GB_S, RECOMMENDED_FLAGS, REPO, SEVENTY_B_GB,  # noqa: E402
                     AnonPoller, MemoryCgroup, check_cgroups, drop_page_cache, folders, goal_rows,
                     goal_table, in_cgroup, input_bytes, machine, make_checkpoints, offline_env,
                     read_bytes, recipes, rss_anon, write_json, write_markdown)

from nearswap_mergekit.tiny import QUARTET  # noqa: E402

#: The QuartetAnemoi card's ladder of t (the base row, t = 0, comes with every ladder).
CARD_TS = (0.0001, 0.0003, 0.001, 0.0025, 0.005, 0.01)
#: The rungs of the from-disk run: enough to see the reads, short enough to repeat.
DISK_TS = (0.0001, 0.001)
#: Text the windows are cut from: the GPL's text, in the repository.
TEXT_SOURCE = REPO / "COPYING"
POLL_S = 0.02

# Llama-2-70B (80 layers, hidden 8192, MLP 28672, 64 heads, 8 KV heads, vocabulary 32,000).
SEVENTY_B = {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "vocab": 32000}
#: Published peak dense bf16 throughput and HBM bandwidth of one H100 SXM, and
#: assumed shares of them; PCIe 5.0 x16 (the NVMe drive: harness.NVME_READ_GB_S).
GPU_BF16_FLOPS, GPU_FLOP_SHARE = 989e12, 0.4
GPU_HBM_BYTES_S, GPU_HBM_SHARE = 3.35e12, 0.5
PCIE_GB_S = 25.0


# --- the children --------------------------------------------------------------------------
# Each child is `python -c CHILD FUNCTION ARGS...`: it imports this file (click, yaml,
# torch via harness.py: all of which the measured programs import anyway) and times itself.

CHILD = "import sys; sys.path.insert(0, sys.argv[1]); import ladder; getattr(ladder, sys.argv[2])(sys.argv[3:])"


def child_command(function: str, *args: object) -> List[str]:
    return [sys.executable, "-c", CHILD, str(HERE), function, *map(str, args)]


class Phases:
    """Wall-clock marks of one child; per phase, the bytes it read from the device and
    its CPU seconds, and its anonymous memory at the end of each."""

    def __init__(self, launched: float):
        self.marks = [("launch", launched, 0, 0.0, 0)]

    def mark(self, name: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.marks.append((name, time.time(), read_bytes(), usage.ru_utime + usage.ru_stime,
                           rss_anon(os.getpid()) or 0))

    def report(self) -> Dict:
        out = {}
        for (_, start, read0, cpu0, _), (name, end, read1, cpu1, anon) in zip(self.marks, self.marks[1:]):
            out[name] = {"s": end - start, "read_bytes": read1 - read0, "cpu_s": cpu1 - cpu0,
                         "anon_bytes_at_end": anon}
        return out


def ladder_child(argv: Sequence[str]) -> None:
    """Run `nearswap-mergekit ladder ARGS` in this process with timers around its phases."""
    launched, report_path, *args = argv
    phases = Phases(float(launched))
    # What the ladder command imports as it starts (lazily, inside the command).
    import accelerate.hooks  # noqa: F401
    import mergekit.merge  # noqa: F401
    import mergekit.plan  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from nearswap_mergekit import cli
    from nearswap_mergekit.ladder import engine as laddering
    from nearswap_mergekit.ladder import families

    phases.mark("start-up")
    run, run_stage = laddering.run, families.run_stage
    forwards = {"s": 0.0, "calls": 0}

    def timed_run(*a, **k):
        phases.mark("planning")
        result = run(*a, **k)
        phases.mark("read + merge + forward")
        return result

    def timed_stage(*a, **k):
        # The streamed loop's forwards, stage by stage (the whole-model path runs its
        # rows' forwards in threads, inseparable from their merges: 0 there).
        started = time.perf_counter()
        try:
            return run_stage(*a, **k)
        finally:
            forwards["s"] += time.perf_counter() - started
            forwards["calls"] += 1

    laddering.run, families.run_stage = timed_run, timed_stage
    try:
        cli.main(args, standalone_mode=False)
    finally:
        phases.mark("report")
        Path(report_path).write_text(json.dumps({"phases": phases.report(), "forward_s": forwards["s"],
                                                 "forward_calls": forwards["calls"]}) + "\n")


def merge_child(argv: Sequence[str]) -> None:
    """The stock `mergekit-yaml ARGS` (its console script's entry point), timed."""
    launched, report_path, *args = argv
    phases = Phases(float(launched))
    from mergekit.scripts.run_yaml import main

    phases.mark("start-up")
    sys.argv = ["mergekit-yaml", *args]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    phases.mark("read + merge + write")
    Path(report_path).write_text(json.dumps({"phases": phases.report(), "code": code}) + "\n")
    sys.exit(code)


def naive_child(argv: Sequence[str]) -> None:
    """The route without the ladder: per rung, mergekit-yaml writes the merge, then
    transformers loads it and `scoring.score_model` scores it; the base row loads the base."""
    launched, plan_path, report_path = argv
    phases = Phases(float(launched))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nearswap_mergekit.ladder import scoring

    phases.mark("start-up")
    plan = json.loads(Path(plan_path).read_text())
    text = scoring.read_text(plan["text"])
    rows = []
    for rung in plan["rungs"]:
        row = {"label": rung["label"], "t": rung["t"]}
        folder = rung.get("model")
        if folder is None:  # a rung: the stock merge first
            folder = rung["out"]
            shutil.rmtree(folder, ignore_errors=True)
            merge_report = Path(plan["work"]) / "naive-merge.json"
            command = child_command("merge_child", time.time(), merge_report, rung["recipe"], folder,
                                    *plan["merge_flags"])
            result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if result.returncode:
                raise SystemExit(f"mergekit-yaml failed on {rung['recipe']}:\n{result.stderr[-2000:]}")
            row["merge"] = json.loads(merge_report.read_text())["phases"]
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder if (Path(folder) / "tokenizer.json").exists()
                                                  else plan["tokenizer"])
        row["load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        (score,) = scoring.score_model(model, tokenizer, [text], plan["context"])
        row["forward_s"] = time.perf_counter() - started
        row["nll"], row["tokens"] = score.nll, score.tokens
        del model
        if rung.get("model") is None:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append(row)
    phases.mark("rungs")
    Path(report_path).write_text(json.dumps({"phases": phases.report(), "rungs": rows}) + "\n")


# --- watching a child ----------------------------------------------------------------------


def process_name(pid: int) -> str:
    """'mergekit-yaml', 'ladder', 'naive' or the command's first word."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    for word, name in ((b"merge_child", "mergekit-yaml"), (b"ladder_child", "ladder"),
                       (b"naive_child", "naive scoring")):
        if word in words:
            return name
    return Path(words[0].decode(errors="replace")).name


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for descendants (theirs included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def watched(command: List[str], report_path: Path, cgroup=None, timeout_s: Optional[float] = None) -> Dict:
    """Run a child (in `cgroup`, a harness.MemoryCgroup, where given), polling its
    anonymous memory; its report, wall time, load average and peaks."""
    if cgroup is not None:
        command = in_cgroup(command, cgroup)
    load_before = os.getloadavg()
    cpu_before = children_cpu_s()
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=offline_env())
    poller = AnonPoller(process.pid, POLL_S, process_name)
    poller.start()
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        if cgroup is not None:
            cgroup.kill_all()
        else:
            os.kill(process.pid, signal.SIGKILL)
        process.communicate()
        poller.stop()
        raise click.ClickException(f"{command[-1]} did not finish in {timeout_s:.0f} s (killed)")
    wall = time.perf_counter() - started
    poller.stop()
    if process.returncode:
        raise click.ClickException(f"{' '.join(command[-6:])} failed:\n{stderr[-3000:]}")
    report = json.loads(report_path.read_text())
    report.update({
        "wall_s": wall,
        "cpu_s": children_cpu_s() - cpu_before,
        "load_average": [load_before, os.getloadavg()],
        "peak_anon_bytes": poller.peaks,
        "peak_anon_sum_bytes": poller.peak_sum,
        "stdout": stdout,
    })
    return report


# --- the models and the text ---------------------------------------------------------------


def with_positions(paths: Dict[str, str], folder: Path, positions: int) -> Dict[str, str]:
    """The family under `folder` with max_position_embeddings = `positions`: each
    model's weights linked, its config rewritten, its tokenizer copied. (tiny's
    configs say 256 positions; RoPE does not depend on it.)"""
    linked = {}
    for name in QUARTET:
        source, target = Path(paths[name]), folder / name
        target.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if file.name == "config.json":
                config = json.loads(file.read_text())
                config["max_position_embeddings"] = max(positions, config["max_position_embeddings"])
                (target / file.name).write_text(json.dumps(config, indent=2) + "\n")
            elif file.suffix == ".safetensors":
                link = target / file.name
                if not link.is_symlink():
                    link.unlink(missing_ok=True)
                    link.symlink_to(file)
            else:
                shutil.copy(file, target / file.name)
        linked[name] = str(target)
    return linked


def text_of_tokens(tokenizer_folder: str, tokens: int, out: Path) -> int:
    """Write the longest prefix of COPYING that is at most `tokens` tokens; its tokens."""
    from transformers import AutoTokenizer

    from nearswap_mergekit.ladder import scoring

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    source = TEXT_SOURCE.read_text(encoding="utf-8")

    def count(chars: int) -> int:
        return len(scoring.tokenize(tokenizer, source[:chars]))

    low, high = 1, len(source)
    if count(high) < tokens:
        raise click.ClickException(f"{TEXT_SOURCE} has fewer than {tokens} tokens")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) <= tokens else (low, middle)
    out.write_text(source[:low], encoding="utf-8")
    return count(low)


def write_recipe(paths: Dict[str, str], t: float, path: Path) -> Path:
    """run.py's one-pass chain (a), bf16, at this t."""
    (doc,) = recipes(paths)["a"]
    doc = {**doc, "parameters": {"t": t}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ladder_command(recipe: Path, text: Path, ts: Sequence[float], context: int, json_path: Path,
                   report_path: Path) -> List[str]:
    args = ["ladder", str(recipe), "--text", str(text), "--context", str(context), "--quiet",
            "--json", str(json_path)]
    for t in ts:
        args += ["--t", repr(t)]
    return child_command("ladder_child", time.time(), report_path, *args)


def naive_command(paths: Dict[str, str], text: Path, ts: Sequence[float], context: int, work: Path,
                  report_path: Path, base_row: bool = True) -> List[str]:
    rungs = [{"label": "base", "t": None, "model": paths[QUARTET[0]]}] if base_row else []
    for t in ts:
        recipe = write_recipe(paths, t, work / f"naive-{t:g}.yml")
        rungs.append({"label": f"t={t:g}", "t": t, "recipe": str(recipe), "out": str(work / "naive-out")})
    plan = {"rungs": rungs, "text": str(text), "context": context, "merge_flags": RECOMMENDED_FLAGS,
            "tokenizer": paths[QUARTET[0]], "work": str(work)}
    plan_path = work / "naive-plan.json"
    plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    return child_command("naive_child", time.time(), plan_path, report_path)


def forward_flops(config: Dict, tokens: int) -> float:
    """Multiply-adds x 2 of one forward over `tokens` positions: every matrix (the
    output head included, the embedding lookup not) and causal attention's scores and
    weighted sums (half of the square)."""
    h, i, layers = config["hidden"], config["intermediate"], config["layers"]
    kv = h // config["heads"] * config["kv_heads"]
    matrices = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + config["vocab"] * h
    return 2 * matrices * tokens + 2 * layers * tokens * tokens * h


def shape_of(folder: str) -> Dict:
    c = json.loads((Path(folder) / "config.json").read_text())
    return {"hidden": c["hidden_size"], "intermediate": c["intermediate_size"], "layers": c["num_hidden_layers"],
            "heads": c["num_attention_heads"], "kv_heads": c["num_key_value_heads"], "vocab": c["vocab_size"]}


def largest_matrix_elements(shape: Dict) -> int:
    return max(shape["hidden"] * shape["intermediate"], shape["vocab"] * shape["hidden"])


# --- 1. side by side -----------------------------------------------------------------------


def summarize_ladder(run_report: Dict, ladder_json: Dict) -> Dict:
    p = run_report["phases"]
    return {
        "wall_s": run_report["wall_s"],
        "cpu_s": run_report["cpu_s"],
        "start_up_s": p["start-up"]["s"],
        "planning_s": p["planning"]["s"],
        "run_s": p["read + merge + forward"]["s"],
        "report_s": p["report"]["s"],
        "json_wall_seconds": ladder_json["wall_seconds"],
        "bytes_read": ladder_json["bytes_read"],
        "peak_bytes_held": ladder_json["peak_bytes_held"],
        "peak_anon_bytes": max(run_report["peak_anon_bytes"].values()),
        "load_average": run_report["load_average"],
        "anon_after_planning_bytes": p["planning"]["anon_bytes_at_end"],
        "nll": {r["label"]: r["texts"][0]["nll"] for r in ladder_json["rungs"]},
        "tokens": ladder_json["rungs"][0]["texts"][0]["tokens"],
        "batches": ladder_json["batches"],
    }


def summarize_naive(parts: List[Dict]) -> Dict:
    """The naive route, run as two processes (see side_by_side), as the one process a
    user would run: the second process's start-up is left out."""
    rows = [row for part in parts for row in part["rungs"]]
    merges = [r["merge"] for r in rows if "merge" in r]
    extra = [part["phases"]["start-up"] for part in parts[1:]]
    return {
        "wall_s": sum(part["wall_s"] for part in parts) - sum(e["s"] for e in extra),
        "cpu_s": sum(part["cpu_s"] for part in parts) - sum(e["cpu_s"] for e in extra),
        "start_up_s": parts[0]["phases"]["start-up"]["s"],
        "merge_start_up_s": sum(m["start-up"]["s"] for m in merges),
        "merge_s": sum(m["read + merge + write"]["s"] for m in merges),
        "load_s": sum(r["load_s"] for r in rows),
        "forward_s": sum(r["forward_s"] for r in rows),
        "forward_s_each": [r["forward_s"] for r in rows],
        "peak_anon_bytes": {name: max(part["peak_anon_bytes"].get(name, 0) for part in parts)
                            for part in parts for name in part["peak_anon_bytes"]},
        "load_average": [parts[0]["load_average"][0], parts[-1]["load_average"][1]],
        "nll": {r["label"]: r["nll"] for r in rows},
        "tokens": rows[0]["tokens"],
    }


def side_by_side(work: Path, params: float, context: int, repeats: int) -> Dict:
    """The naive route runs as two processes, the base and the first half of the
    rungs before the ladder and the rest after it, so that both contenders see the
    same drift in the machine's load."""
    paths = make_checkpoints(work, params)
    paths = with_positions(paths, work / f"ladder-{Path(paths[QUARTET[0]]).parent.name}-{context}", context)
    text = work / "ladder-text.txt"
    tokens = text_of_tokens(paths[QUARTET[0]], context - 1, text)
    recipe = write_recipe(paths, CARD_TS[0], work / "ladder-recipe.yml")
    ladder_json = work / "ladder.json"
    half = len(CARD_TS) // 2
    runs: Dict[str, List[Dict]] = {"ladder": [], "naive": []}
    for round_ in range(1, repeats + 1):
        parts = []
        for key, ts in (("naive", CARD_TS[:half]), ("ladder", CARD_TS), ("naive", CARD_TS[half:])):
            click.echo(f"  run {round_}/{repeats}: {key}" + (f", t = {', '.join(map(str, ts))}"
                                                             if key == "naive" else ""))
            report_path = work / f"{key}-report.json"
            if key == "ladder":
                command = ladder_command(recipe, text, ts, context, ladder_json, report_path)
                summary = summarize_ladder(watched(command, report_path), json.loads(ladder_json.read_text()))
                runs["ladder"].append(summary)
            else:
                command = naive_command(paths, text, ts, context, work, report_path, base_row=not parts)
                summary = watched(command, report_path)
                parts.append(summary)
            click.echo(f"    {summary['wall_s']:.1f} s, load {summary['load_average'][0][0]:.1f}")
        runs["naive"].append(summarize_naive(parts))
    return {"checkpoints": paths, "input_bytes": input_bytes(paths), "text_tokens": tokens,
            "context": context, "positions": json.loads((Path(paths[QUARTET[0]]) / "config.json").read_text())[
                "max_position_embeddings"], "shape": shape_of(paths[QUARTET[0]]), "runs": runs}


def fastest_run(runs: List[Dict]) -> Dict:
    """The run of least wall time: other jobs on the machine only ever add to it."""
    return min(runs, key=lambda r: r["wall_s"])


def compare(side: Dict) -> Dict:
    ladder, naive = fastest_run(side["runs"]["ladder"]), fastest_run(side["runs"]["naive"])
    forward = naive["forward_s"]
    ladder_rows = {
        "start_up_s": ladder["start_up_s"],
        "planning_s": ladder["planning_s"],
        "read_merge_s": ladder["run_s"] - forward,
        "forward_s": forward,
        "other_s": ladder["wall_s"] - ladder["start_up_s"] - ladder["planning_s"] - ladder["run_s"],
        "wall_s": ladder["wall_s"],
    }
    naive_rows = {
        "start_up_s": naive["start_up_s"] + naive["merge_start_up_s"],
        "read_merge_write_s": naive["merge_s"],
        "load_s": naive["load_s"],
        "forward_s": forward,
        "other_s": naive["wall_s"] - naive["start_up_s"] - naive["merge_start_up_s"] - naive["merge_s"]
        - naive["load_s"] - forward,
        "wall_s": naive["wall_s"],
    }
    relative = {label: abs(ladder["nll"][label] - naive["nll"][label]) / abs(naive["nll"][label])
                for label in naive["nll"]}
    outside_ladder = ladder["wall_s"] - forward
    outside_naive = naive["wall_s"] - forward
    flops = forward_flops(side["shape"], side["context"])
    return {
        "ladder": ladder_rows,
        "naive": naive_rows,
        "nll_relative_difference": relative,
        "tokens_agree": ladder["tokens"] == naive["tokens"],
        "outside_forward_ratio": outside_ladder / outside_naive,
        "speedup": naive["wall_s"] / ladder["wall_s"],
        "speedup_per_round": [naive_run["wall_s"] / ladder_run["wall_s"] for ladder_run, naive_run
                              in zip(side["runs"]["ladder"], side["runs"]["naive"])],
        "cpu_s": {"ladder": ladder["cpu_s"], "naive": naive["cpu_s"]},
        "cpu_speedup": naive["cpu_s"] / ladder["cpu_s"],
        "forward_flops": flops,
        "forward_flop_rate": flops * len(naive["forward_s_each"]) / forward,
        # Seven rungs' merges of every input byte, per second of read + merge.
        "merge_input_gb_s": len(naive["forward_s_each"]) * side["input_bytes"] / 1e9 / ladder_rows["read_merge_s"],
        "ladder_peak_anon_bytes": ladder["peak_anon_bytes"],
        "ladder_anon_after_planning_bytes": ladder["anon_after_planning_bytes"],
        "naive_peak_anon_bytes": max(naive["peak_anon_bytes"].values()),
    }


# --- 2. from disk under a memory limit -----------------------------------------------------


def raw_read_gb_s(paths: Dict[str, str], work: Path) -> float:
    """Read every input once, page cache dropped: the device's rate for these files."""
    drop_page_cache(work)
    started, total = time.perf_counter(), 0
    buffer = bytearray(64 << 20)
    for name in QUARTET:
        for file in Path(paths[name]).glob("*.safetensors"):
            with open(file, "rb", buffering=0) as handle:
                while count := handle.readinto(buffer):
                    total += count
    return total / 1e9 / (time.perf_counter() - started)


def from_disk(work: Path, params: float, limit_gib: float, tokens: int, timeout_s: float) -> Dict:
    check_cgroups()
    paths = make_checkpoints(work, params)
    inputs = input_bytes(paths)
    if limit_gib * GIB >= inputs:
        raise click.UsageError(f"--disk-limit-gib {limit_gib} is not below the inputs ({inputs / GIB:.1f} GiB)")
    text = work / "ladder-disk-text.txt"
    text_tokens = text_of_tokens(paths[QUARTET[0]], tokens - 1, text)
    recipe = write_recipe(paths, DISK_TS[0], work / "ladder-disk-recipe.yml")
    result: Dict = {"checkpoints": paths, "shape": shape_of(paths[QUARTET[0]]), "input_bytes": inputs,
                    "limit_bytes": int(limit_gib * GIB),
                    "text_tokens": text_tokens, "context": tokens, "ts": list(DISK_TS)}
    click.echo("  raw read of the inputs")
    result["raw_read_gb_s"] = raw_read_gb_s(paths, work)
    click.echo(f"    {result['raw_read_gb_s']:.2f} GB/s")

    click.echo(f"  ladder, limit {limit_gib:g} GiB")
    result["cache"] = drop_page_cache(work)
    cgroup = MemoryCgroup(int(limit_gib * GIB))
    report_path, ladder_json = work / "ladder-disk-report.json", work / "ladder-disk.json"
    try:
        command = ladder_command(recipe, text, DISK_TS, tokens, ladder_json, report_path)
        run = watched(command, report_path, cgroup, timeout_s)
        run.update({"max_usage_bytes": cgroup.max_usage(), "failed_charges": cgroup.failed_charges(),
                    "oom_kills": cgroup.oom_kills()})
    finally:
        cgroup.remove()
    run["json"] = {k: v for k, v in json.loads(ladder_json.read_text()).items() if k != "rungs"}
    run.pop("stdout")
    result["ladder"] = run
    click.echo(f"    {run['wall_s']:.1f} s")

    click.echo("  naive route, one rung (no limit)")
    result["cache_naive"] = drop_page_cache(work)
    report_path = work / "naive-disk-report.json"
    naive = watched(naive_command(paths, text, DISK_TS[:1], tokens, work, report_path, base_row=False),
                    report_path)
    naive.pop("stdout")
    result["naive"] = naive
    click.echo(f"    {naive['wall_s']:.1f} s")
    shutil.rmtree(work / "naive-out", ignore_errors=True)
    return result


def disk_summary(disk: Dict) -> Dict:
    phases = disk["ladder"]["phases"]
    inputs = disk["input_bytes"]
    device_reads = {name: p["read_bytes"] for name, p in phases.items()}
    after_start = sum(v for k, v in device_reads.items() if k != "start-up")
    return {
        "read_bytes": device_reads,
        "read_over_inputs": after_start / inputs,
        "run_read_over_inputs": device_reads["read + merge + forward"] / inputs,
        "ladder_peak_anon_bytes": max(disk["ladder"]["peak_anon_bytes"].values()),
        "naive_peak_anon_bytes": disk["naive"]["peak_anon_bytes"],
        "run_gb_s": inputs / 1e9 / phases["read + merge + forward"]["s"],
    }


# --- 3. a 4 x 70B ladder -------------------------------------------------------------------


def estimate_70b(report: Dict) -> Dict:
    """Hours for 4 x 70B, 2,048 positions, base + 6 rungs, from the measured rates.
    Each read of the inputs takes the slower of reading them and computing on them."""
    c, side = report["comparison"], report["side_by_side"]
    rungs = 1 + len(CARD_TS)
    inputs_gb = 4 * SEVENTY_B_GB
    flops = forward_flops(SEVENTY_B, 2048)
    ladder = c["ladder"]
    # Planning scales with the number of tensors (9 per layer, 3 more).
    start = ladder["start_up_s"] + ladder["planning_s"] * (80 * 9 + 3) / (side["shape"]["layers"] * 9 + 3)
    disk = report.get("from_disk")
    disk_read_s = inputs_gb / disk["raw_read_gb_s"] if disk else 0.0
    # The ladder counts full swaps as it merges: all rungs share one read of the inputs.
    cpu = {
        "start_up_and_planning_s": start,
        "read_merge_s": max(rungs * inputs_gb / c["merge_input_gb_s"], disk_read_s),
        "forward_s": rungs * flops / c["forward_flop_rate"],
        "disk_read_once_s": disk_read_s,
    }
    nvme_read_s = inputs_gb / NVME_READ_GB_S
    gpu = {
        "start_up_and_planning_s": start,
        # Per rung, its four inputs read and one output written in bf16 on the device; the
        # inputs come from the drive and cross to the device once.
        "read_merge_s": max(rungs * (inputs_gb + SEVENTY_B_GB) * 1e9 / (GPU_HBM_BYTES_S * GPU_HBM_SHARE),
                            inputs_gb / PCIE_GB_S, nvme_read_s),
        "forward_s": rungs * flops / (GPU_BF16_FLOPS * GPU_FLOP_SHARE),
    }
    for estimate in (cpu, gpu):
        estimate["total_s"] = sum(estimate[key] for key in
                                  ("start_up_and_planning_s", "read_merge_s", "forward_s"))
    scale = largest_matrix_elements(SEVENTY_B) / largest_matrix_elements(side["shape"])
    anon, start_anon = c["ladder_peak_anon_bytes"], c["ladder_anon_after_planning_bytes"]
    return {
        "inputs_gb": inputs_gb, "rungs": rungs, "forward_flops": flops, "cpu": cpu, "gpu": gpu,
        "largest_matrix_scale": scale,
        "cpu_peak_anon_gib": (start_anon + (anon - start_anon) * scale) / GIB,
    }


# --- report --------------------------------------------------------------------------------


def section(paragraph: str, columns: Sequence[str]) -> List[str]:
    """A paragraph, then the head of the table under it (first column left, the rest right)."""
    return ["", paragraph, "", f"| {' | '.join(columns)} |", "|---|" + "---:|" * (len(columns) - 1)]


def markdown(report: Dict) -> str:
    side, c = report["side_by_side"], report["comparison"]
    shape, L, N = side["shape"], c["ladder"], c["naive"]
    gb = side["input_bytes"] / 1e9
    runs = side["runs"]
    first_half = ", ".join(f"{t:g}" for t in CARD_TS[:len(CARD_TS) // 2])
    loads = [r["load_average"][0][0] for k in runs for r in runs[k]] + \
            [r["load_average"][1][0] for k in runs for r in runs[k]]
    setting = (
        f"**The ladder against the naive route**: four bf16 checkpoints, Llama-2-7B layer shapes "
        f"(hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['layers']} layers, vocabulary "
        f"{shape['vocab']}; {gb / 4:.2f} GB each, {gb:.2f} GB of input), page cache warm; the base and "
        f"{len(CARD_TS)} rungs (t = {', '.join(f'{t:g}' for t in CARD_TS)}); one window of "
        f"{side['context']:,} positions (the BOS and {side['text_tokens']:,} tokens of COPYING; the "
        f"checkpoints' configs set to {side['positions']:,} positions), float32 on the CPU. "
        f"{len(runs['ladder'])} run(s) of each; the naive route "
        f"in two processes, before the ladder (the base and t = {first_half}) "
        "and after it (the rest), so that both see the same drift in load, and counted as one process "
        "(one start-up of its scoring process); the fastest run of each shown (naive / ladder wall "
        f"per round: {', '.join(f'{x:.2f}x' for x in c['speedup_per_round'])})."
    )
    lines = [
        f"Measured {report['date']} on {report['machine']}; load average (1 min) during the runs "
        f"{min(loads):.1f}-{max(loads):.1f} (other jobs share the 2 cores; the average counts this "
        f"benchmark's own threads too, seven in the ladder). Benchmark wall time "
        f"{report['benchmark_s'] / 60:.1f} min.",
        *section(setting, ("phase", "ladder, s", "naive route, s")),
        f"| start-up (imports; naive: its scoring process + {len(CARD_TS)} mergekit-yaml) | "
        f"{L['start_up_s']:.1f} | {N['start_up_s']:.1f} |",
        f"| planning (mergekit's planner, tokenizer, text) | {L['planning_s']:.1f} | (in read + merge) |",
        f"| read + merge (naive: + write, mergekit-yaml) | {L['read_merge_s']:.1f} | "
        f"{N['read_merge_write_s']:.1f} |",
        f"| load (transformers, float32) | | {N['load_s']:.1f} |",
        f"| forward ({1 + len(CARD_TS)} x {side['context']:,} positions) | {L['forward_s']:.1f} | "
        f"{N['forward_s']:.1f} |",
        f"| other (report, clean-up, waiting) | {L['other_s']:.1f} | {N['other_s']:.1f} |",
        f"| **wall** | **{L['wall_s']:.1f}** | **{N['wall_s']:.1f}** |",
        f"| CPU seconds, all processes | {c['cpu_s']['ladder']:.1f} | {c['cpu_s']['naive']:.1f} |",
        "",
        "The ladder's forwards run in lockstep with its merges and cannot be timed apart from "
        "inside: its forward row is the naive route's measured forwards (the same seven, same shapes, "
        "dtype and tokens) and its read + merge is the rest of `ladder.run`.",
        "",
        *goal_table(report["goals"], ".3g"),
    ]
    worst = max(c["nll_relative_difference"].values())
    lines += [
        "",
        f"NLL, ladder against naive: largest relative difference {worst:.1e} over the "
        f"{len(c['nll_relative_difference'])} rows (tokens scored agree: {c['tokens_agree']}). "
        f"Peak anonymous memory (RssAnon): ladder {c['ladder_peak_anon_bytes'] / GIB:.2f} GiB, naive "
        f"{c['naive_peak_anon_bytes'] / GIB:.2f} GiB (its scoring process with a float32 model loaded). "
        f"Forward rate {c['forward_flop_rate'] / 1e9:.0f} GFLOP/s; the ladder's read + merge "
        f"{c['merge_input_gb_s']:.2f} GB of input per second, all rungs counted.",
    ]
    if "from_disk" in report:
        lines += disk_markdown(report)
    lines += estimate_markdown(report)
    return "\n".join(lines) + "\n"


def disk_markdown(report: Dict) -> List[str]:
    disk, s = report["from_disk"], report["disk_summary"]
    shape = disk["shape"]
    phases = disk["ladder"]["phases"]
    naive = disk["naive"]["peak_anon_bytes"]
    setting = (
        f"**From disk**: four bf16 checkpoints with the same layer shapes, {shape['layers']} layers "
        f"({disk['input_bytes'] / 1e9:.2f} GB of input, {disk['input_bytes'] / GIB:.2f} GiB); page cache "
        f"dropped ({disk['cache']}); the ladder (base + t = {', '.join(f'{t:g}' for t in disk['ts'])}, "
        f"{disk['context']} positions) in a memory cgroup limited to {disk['limit_bytes'] / GIB:g} GiB "
        f"(its peak usage, page cache included: {disk['ladder']['max_usage_bytes'] / GIB:.2f} GiB; "
        f"{disk['ladder']['failed_charges']:,} failed charges, {disk['ladder']['oom_kills']} OOM kills). "
        f"A raw read of the inputs ran at {disk['raw_read_gb_s']:.2f} GB/s."
    )
    lines = section(setting, ("ladder phase", "s", "read from the device, GB", "/ inputs"))
    for name, p in phases.items():
        lines.append(f"| {name} | {p['s']:.1f} | {p['read_bytes'] / 1e9:.2f} | "
                     f"{p['read_bytes'] / disk['input_bytes']:.2f} |")
    lines += [
        f"| **all but start-up** | | | **{s['read_over_inputs']:.2f}** |",
        "",
        f"Start-up reads Python's and torch's files (the page cache was dropped). "
        f"Peak anonymous memory: the ladder {s['ladder_peak_anon_bytes'] / GIB:.2f} GiB; the naive route "
        f"(one rung) mergekit-yaml {naive.get('mergekit-yaml', 0) / GIB:.2f} GiB, then loading and scoring "
        f"{naive.get('naive scoring', 0) / GIB:.2f} GiB.",
    ]
    return lines


def estimate_markdown(report: Dict) -> List[str]:
    e = report["estimate_70b"]
    cpu, gpu = e["cpu"], e["gpu"]

    def hours(key: str) -> str:
        return f"{cpu[key] / 3600:.2f} | {gpu[key] / 3600:.{3 if gpu[key] < 36 else 2}f}"

    setting = (
        f"**A 4 x 70B ladder, estimated** (not measured): Llama-2-70B shapes, four bf16 inputs of "
        f"{SEVENTY_B_GB:.0f} GB, {e['rungs']} rows (base + {e['rungs'] - 1} rungs), one window of 2,048 "
        f"positions ({e['forward_flops'] / 1e12:.0f} TFLOP per forward)."
    )
    return [
        *section(setting, ("part", "this machine (2 cores, its disk), h", "one GPU (published figures), h")),
        f"| start-up and planning | {hours('start_up_and_planning_s')} |",
        f"| read + merge | {hours('read_merge_s')} |",
        f"| forward | {hours('forward_s')} |",
        f"| **total** | **{cpu['total_s'] / 3600:.1f}** | **{gpu['total_s'] / 3600:.2f}** |",
        "",
        "CPU: each part at its rate measured above (forward FLOP/s, GB of input merged per second for "
        "all rungs); each read of the inputs is the slower of computing and this disk's raw rate "
        f"({cpu['disk_read_once_s'] / 3600:.2f} h per read of {e['inputs_gb']:.0f} GB). "
        f"Peak anonymous memory: the side-by-side ladder's peak above its start-up (seven rows' float32 "
        f"copies of the largest matrix, two weights' inputs, seven forwards' activations) scaled by the "
        f"largest matrix ({e['largest_matrix_scale']:.1f}x, the 70B's embedding): about "
        f"{e['cpu_peak_anon_gib']:.0f} GiB; the naive route's scoring process would hold a float32 70B, "
        f"about 257 GiB. "
        f"GPU: not measured (the ladder has not been run on one); an H100 SXM at {GPU_FLOP_SHARE:.0%} of "
        f"its published {GPU_BF16_FLOPS / 1e12:.0f} dense bf16 TFLOP/s for the forwards and "
        f"{GPU_HBM_SHARE:.0%} of its {GPU_HBM_BYTES_S / 1e12:.2f} TB/s for the merges, inputs from an "
        f"NVMe drive at {NVME_READ_GB_S} GB/s and to the device at {PCIE_GB_S:g} GB/s.",
    ]


def goals(report: Dict) -> List[Dict]:
    c = report["comparison"]
    rows = [
        ("ladder / naive, time outside forward passes <= 1/3", c["outside_forward_ratio"], 1 / 3, False),
        (f"naive / ladder, whole wall time at {report['side_by_side']['context']:,} positions >= 1.3",
         c["speedup"], 1.3, True),
        ("NLL relative difference, ladder against naive <= 1e-6",
         max(c["nll_relative_difference"].values()), 1e-6, False),
    ]
    if "disk_summary" in report:
        rows.append(("from disk: bytes read from the device (start-up excluded) / inputs <= 1.2",
                     report["disk_summary"]["read_over_inputs"], 1.2, False))
    return goal_rows(rows)


@click.command()
@click.option("--params", default=5e8, show_default=True, help="Parameters per checkpoint, side by side.")
@click.option("--context", default=2048, show_default=True, help="Positions of the one window scored.")
@click.option("--repeats", default=2, show_default=True, help="Rounds of the two contenders.")
@click.option("--disk-params", default=1e9, show_default=True,
              help="Parameters per checkpoint from disk (1e9: 8.5 GB of input).")
@click.option("--disk-limit-gib", default=4.0, show_default=True, help="The ladder's memory limit from disk.")
@click.option("--disk-context", default=128, show_default=True, help="Positions scored from disk.")
@click.option("--skip-disk", is_flag=True, help="No from-disk part (it needs root and a memory cgroup).")
@click.option("--timeout", default=1800.0, show_default=True,
              help="Seconds before the from-disk ladder counts as hung (killed).")
@click.option("--keep-checkpoints", is_flag=True,
              help="Keep the from-disk checkpoints (deleted after use by default; run.py rebuilds them).")
@click.option("--work", default=str(HERE / "work"), show_default=True, type=click.Path())
@click.option("--results", default=str(HERE / "results"), show_default=True, type=click.Path())
@click.option("--report-only", is_flag=True, help="Rewrite ladder.md from ladder.json; run nothing.")
def main(params, context, repeats, disk_params, disk_limit_gib, disk_context, skip_disk, timeout,
         keep_checkpoints, work, results, report_only):
    """Run the ladder against the naive route, and from disk, and write ladder.json and ladder.md."""
    started = time.perf_counter()
    work, results = Path(work).resolve(), Path(results).resolve()
    if report_only:
        report = json.loads((results / "ladder.json").read_text())
        report["estimate_70b"] = estimate_70b(report)
        report["goals"] = goals(report)
        write_markdown(results / "ladder.md", markdown(report))
        return
    folders(work, results)
    report: Dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "ts": list(CARD_TS)}
    click.echo("side by side")
    report["side_by_side"] = side_by_side(work, params, context, repeats)
    report["comparison"] = compare(report["side_by_side"])
    if not skip_disk:
        click.echo("from disk")
        report["from_disk"] = from_disk(work, disk_params, disk_limit_gib, disk_context, timeout)
        report["disk_summary"] = disk_summary(report["from_disk"])
        if not keep_checkpoints:
            shutil.rmtree(Path(report["from_disk"]["checkpoints"][QUARTET[0]]).parent)
    report["estimate_70b"] = estimate_70b(report)
    report["goals"] = goals(report)
    report["benchmark_s"] = time.perf_counter() - started
    write_json(results / "ladder.json", report)
    write_markdown(results / "ladder.md", markdown(report))


if __name__ == "__main__":
    main()
