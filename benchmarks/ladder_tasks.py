"""`ladder --task` against the naive route (mergekit-yaml + lm-eval's own command per
rung), side by side in one run, each from a cold disk.

    sudo .venv/bin/python benchmarks/ladder_tasks.py   # writes benchmarks/results/ladder_tasks.{json,md}

run.py's benchmark quartet (four bf16 checkpoints of Llama-2-7B layer shapes, `--params`
each), a local multiple-choice task of `--items` questions with four choices (each
choice a phrase of several tokens, so lm-eval's `hf` backend and the ladder forward
each (question, choice) pair alike: neither shares a forward between them), the base
and six rungs at the QuartetAnemoi card's t, float32 on the CPU:
- the ladder: one `nearswap-mergekit ladder RECIPE --task bench_mc --include-path DIR
  --t ... --json` process (ladder.ladder_child: its forwards timed stage by stage);
- the naive route: per rung the stock `mergekit-yaml` writes the merge (the recommended
  flags), then `lm_eval --model hf --model_args pretrained=MERGE,dtype=float32
  --batch_size 1 --device cpu` scores it (its forwards, `HFLM._model_call`, timed); the
  base row scores the base.
Before each, the page cache is dropped; each runs in a memory cgroup of `--limit-gib`.
The limit is above the inputs: the streamed ladder holds every row's merged copy of
one layer, and a layer of these shapes is 0.7 GB in float32 (seven rows: 5 GB), more
than the inputs' 4.3 GB (ladder_streamed.py has the run below the inputs, on
smaller layers). So the page cache keeps the inputs after their first read, which
spares the naive route's later merges the device. Bytes are given two ways: those
asked of the checkpoint files (the ladder's own count; for the naive route, each
merge reads every input and each lm-eval run loads one checkpoint) and those read
from the device (each process's /proc/self/io, start-up excluded). Both routes' acc
and acc_norm are compared rung by rung.

Then zero-shot and 5-shot MMLU (14,042 questions) on 4 x 70B, on one GPU: tokens
forwarded, passes, hours, every number extrapolated from published figures (no GPU
was lent) and marked so.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import click
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import (GIB, NVME_READ_GB_S, NVME_WRITE_GB_S, RECOMMENDED_FLAGS, SEVENTY_B_GB,  # noqa: E402
                     check_cgroups, folders, input_bytes, machine, make_checkpoints, read_bytes, write_json,
                     write_markdown, write_results)
from ladder import (CARD_TS, GPU_BF16_FLOPS, GPU_FLOP_SHARE, SEVENTY_B, TEXT_SOURCE, Phases,  # noqa: E402
                    child_command, forward_flops, shape_of, watched, write_recipe)
from ladder_streamed import contender, device_reads  # noqa: E402

from nearswap_mergekit.tiny import QUARTET  # noqa: E402

TASK = "bench_mc"
ROWS = 1 + len(CARD_TS)
CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); import ladder_tasks; "
         "getattr(ladder_tasks, sys.argv[2])(sys.argv[3:])")
#: MMLU's test split, and its mean 5-shot prompt (5 dev questions with their answers,
#: then the question) in characters, from evalscope's MMLU page (v1.6.0 "Data
#: Statistics": 3,212.2), at an assumed 4 characters per Llama token.
MMLU_QUESTIONS = 14_042
MMLU_5_SHOT_CHARS = 3212.2
CHARS_PER_TOKEN = 4.0
#: GPU memory for the hidden states of 4 x 70B (as ladder_streamed.py's estimate).
GPU_BUDGET = 40 * GIB


def own_child(function: str, *args: object) -> List[str]:
    return [sys.executable, "-c", CHILD, str(HERE), function, *map(str, args)]


# --- the task ------------------------------------------------------------------------------


def write_task(folder: Path, items: int) -> Path:
    """A multiple-choice task of `items` questions, four phrases each, in words of COPYING."""
    folder.mkdir(parents=True, exist_ok=True)
    words = re.findall(r"[a-z]+", TEXT_SOURCE.read_text(encoding="utf-8").lower())
    rnd = random.Random(0)
    phrase = lambda low, high: " ".join(rnd.choice(words) for _ in range(rnd.randint(low, high)))  # noqa: E731
    data = folder / f"{TASK}.jsonl"
    with open(data, "w", encoding="utf-8") as file:
        for _ in range(items):
            row = {"question": phrase(3, 8), "choices": [phrase(1, 3) for _ in range(4)], "answer": rnd.randrange(4)}
            file.write(json.dumps(row) + "\n")
    config = {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "output_type": "multiple_choice",
              "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
              "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


# --- the children --------------------------------------------------------------------------


def lm_eval_child(argv: Sequence[str]) -> None:
    """lm-eval's own command (`lm_eval ARGS`) in this process, its forwards timed."""
    launched, report_path, output, *args = argv
    phases = Phases(float(launched))
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.models.huggingface import HFLM

    phases.mark("start-up")
    timed = {"s": 0.0, "calls": 0}
    call = HFLM._model_call

    def timed_call(self, *a, **k):
        started = time.perf_counter()
        try:
            return call(self, *a, **k)
        finally:
            timed["s"] += time.perf_counter() - started
            timed["calls"] += 1

    HFLM._model_call = timed_call
    sys.argv = ["lm_eval", *args, "--output_path", output]
    cli_evaluate()
    phases.mark("evaluate")
    (found,) = Path(output).rglob("results_*.json")
    results = json.loads(found.read_text())["results"]
    Path(report_path).write_text(json.dumps({"phases": phases.report(), "forward_s": timed["s"],
                                             "forward_calls": timed["calls"], "results": results}) + "\n")


def naive_child(argv: Sequence[str]) -> None:
    """Per rung: the stock mergekit-yaml writes the merge, lm-eval's command scores it."""
    plan_path, report_path = argv
    plan = json.loads(Path(plan_path).read_text())
    work = Path(plan["work"])
    started, read0 = time.perf_counter(), read_bytes()
    rows = []
    for rung in plan["rungs"]:
        row = {"label": rung["label"]}
        folder = rung.get("model")
        if folder is None:
            folder = rung["out"]
            shutil.rmtree(folder, ignore_errors=True)
            merge_report = work / "naive-tasks-merge.json"
            command = child_command("merge_child", time.time(), merge_report, rung["recipe"], folder,
                                    *plan["merge_flags"])
            result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if result.returncode:
                raise SystemExit(f"mergekit-yaml failed on {rung['recipe']}:\n{result.stderr[-2000:]}")
            row["merge"] = json.loads(merge_report.read_text())["phases"]
        eval_report, output = work / "naive-tasks-eval.json", work / "naive-tasks-lm-eval"
        shutil.rmtree(output, ignore_errors=True)
        command = own_child("lm_eval_child", time.time(), eval_report, output, "--model", "hf", "--model_args",
                            f"pretrained={folder},dtype=float32", "--tasks", TASK, "--include_path",
                            plan["tasks"], "--batch_size", "1", "--device", "cpu")
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode:
            raise SystemExit(f"lm_eval failed on {folder}:\n{result.stderr[-2000:]}")
        row["eval"] = json.loads(eval_report.read_text())
        if rung.get("model") is None:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append(row)
    Path(report_path).write_text(json.dumps({
        "phases": {"rungs": {"s": time.perf_counter() - started, "read_bytes": read_bytes() - read0}},
        "rungs": rows}) + "\n")


# --- the contenders ------------------------------------------------------------------------


def ladder_run(recipe: Path, tasks: Path, work: Path, cgroup, timeout: float) -> Dict:
    json_path, report_path = work / "tasks-ladder.json", work / "tasks-ladder-report.json"
    args = ["ladder", str(recipe), "--task", TASK, "--include-path", str(tasks), "--quiet", "--json",
            str(json_path)]
    for t in CARD_TS:
        args += ["--t", repr(t)]
    run = watched(child_command("ladder_child", time.time(), report_path, *args), report_path, cgroup, timeout)
    run.pop("stdout")
    result = json.loads(json_path.read_text())
    run["json"] = {k: v for k, v in result.items() if k != "rungs"}
    run["tasks"] = {r["label"]: r["tasks"][TASK] for r in result["rungs"]}
    return run


def naive_run(paths: Dict[str, str], tasks: Path, work: Path, cgroup, timeout: float) -> Dict:
    rungs = [{"label": "base", "model": paths[QUARTET[0]]}]
    for t in CARD_TS:
        recipe = write_recipe(paths, t, work / f"naive-tasks-{t:g}.yml")
        rungs.append({"label": f"t={t:g}", "recipe": str(recipe), "out": str(work / "naive-tasks-out")})
    plan_path, report_path = work / "naive-tasks-plan.json", work / "naive-tasks-report.json"
    plan_path.write_text(json.dumps({"rungs": rungs, "tasks": str(tasks), "merge_flags": RECOMMENDED_FLAGS,
                                     "work": str(work)}, indent=2) + "\n")
    run = watched(own_child("naive_child", plan_path, report_path), report_path, cgroup, timeout)
    run.pop("stdout")
    return run


# --- the summary ---------------------------------------------------------------------------


def summarize(report: Dict) -> Dict:
    inputs = report["input_bytes"]
    ladder, naive = report["ladder"], report["naive"]
    naive_reads = sum(device_reads(row["eval"]) + (device_reads({"phases": row["merge"]}) if "merge" in row else 0)
                      for row in naive["rungs"])
    naive_forward = sum(row["eval"]["forward_s"] for row in naive["rungs"])
    differences = []
    for row in naive["rungs"]:
        got, expected = ladder["tasks"][row["label"]], row["eval"]["results"][TASK]
        differences += [abs(got[key] - expected[key]) for key in ("acc,none", "acc_norm,none")]
    return {
        "ladder": {"wall_s": ladder["wall_s"], "run_s": ladder["phases"]["read + merge + forward"]["s"],
                   "forward_s": ladder["forward_s"], "forward_share": ladder["forward_s"] / ladder["wall_s"],
                   "device_read_over_inputs": device_reads(ladder) / inputs,
                   "bytes_read_over_inputs": ladder["json"]["bytes_read"] / inputs,
                   "stage_calls": ladder["forward_calls"], "peak_anon_bytes": max(ladder["peak_anon_bytes"].values())},
        "naive": {"wall_s": naive["wall_s"], "forward_s": naive_forward,
                  "forward_share": naive_forward / naive["wall_s"], "device_read_over_inputs": naive_reads / inputs,
                  "forwards": sum(row["eval"]["forward_calls"] for row in naive["rungs"]),
                  "peak_anon_bytes": max(naive["peak_anon_bytes"].values())},
        "asked_over_inputs": {
            "ladder": ladder["json"]["bytes_read"] / inputs,
            # Each merge reads every input; each lm-eval run loads one checkpoint (the
            # base's size: a merge is written in the base's dtype and shapes).
            "naive": (len(CARD_TS) * inputs + ROWS * report["checkpoint_bytes"]) / inputs,
        },
        "speedup": naive["wall_s"] / ladder["wall_s"],
        "acc_largest_difference": max(differences),
    }


def estimate_mmlu_70b() -> List[Dict]:
    """Zero-shot and 5-shot MMLU on 4 x 70B (base + 6 rungs) on one GPU, the ladder
    against the naive route: every number extrapolated. One forward per question (its
    four answers, " A" to " D", are one token each with Llama's tokenizer: the ladder
    and lm-eval's hf backend both forward the question once). Hidden states in bf16
    on the GPU, GPU_BUDGET of them per pass."""
    five_shot = MMLU_5_SHOT_CHARS / CHARS_PER_TOKEN
    rows = []
    # Zero-shot: about one sixth of the 5-shot prompt (the question alone, of six alike).
    for shots, tokens in ((0, five_shot / 6), (5, five_shot)):
        tokens = round(tokens)
        forwarded = MMLU_QUESTIONS * tokens
        hidden = ROWS * forwarded * SEVENTY_B["hidden"] * 2
        passes = max(1, math.ceil(hidden / GPU_BUDGET))
        forward_s = MMLU_QUESTIONS * ROWS * forward_flops(SEVENTY_B, tokens) / (GPU_BF16_FLOPS * GPU_FLOP_SHARE)
        inputs_gb = 4 * SEVENTY_B_GB
        ladder_s = passes * inputs_gb / NVME_READ_GB_S + forward_s
        # Per rung: read the inputs, write the merge (mergekit-yaml), read it back (lm-eval).
        naive_s = (len(CARD_TS) * (inputs_gb / NVME_READ_GB_S + SEVENTY_B_GB / NVME_WRITE_GB_S)
                   + ROWS * SEVENTY_B_GB / NVME_READ_GB_S + forward_s)
        rows.append({"shots": shots, "tokens_per_question": tokens, "tokens_forwarded_per_row": forwarded,
                     "hidden_gib": hidden / GIB, "passes": passes, "forward_h": forward_s / 3600,
                     "ladder_h": ladder_s / 3600, "naive_h": naive_s / 3600,
                     "naive_written_gb": len(CARD_TS) * SEVENTY_B_GB})
    return rows


def markdown(report: Dict) -> str:
    s, shape = report["summary"], report["shape"]
    ladder, naive = s["ladder"], s["naive"]
    requests = report["ladder"]["json"]["requests"]
    lines = [
        f"Measured {report['date']} on {report['machine']}; benchmark wall time {report['benchmark_s'] / 60:.1f} "
        f"min; load average (1 min) {report['load'][0]:.1f} before, {report['load'][1]:.1f} after.",
        "",
        f"Four bf16 checkpoints (hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['layers']} layers, "
        f"vocabulary {shape['vocab']}; {report['input_bytes'] / 1e9:.2f} GB of input), the base and "
        f"{len(CARD_TS)} rungs; a local multiple-choice task of {report['items']} questions with 4 choices "
        f"({requests['loglikelihood']:,} loglikelihood requests, {requests['tokens']:,} tokens forwarded per "
        f"row); float32 on the CPU; each route from a cold disk (page cache dropped), in a memory cgroup of "
        f"{report['limit_bytes'] / GIB:g} GiB, above the inputs' {report['input_bytes'] / GIB:.2f} GiB: the "
        "page cache keeps them after their first read, for the naive route's later merges too.",
        "",
        "| | `ladder --task` | naive: `mergekit-yaml` + `lm_eval --model hf` per rung |",
        "|---|---:|---:|",
        f"| wall, s | {ladder['wall_s']:.1f} | {naive['wall_s']:.1f} |",
        f"| forwards, s (their share of the wall time) | {ladder['forward_s']:.1f} ({ladder['forward_share']:.0%}) "
        f"| {naive['forward_s']:.1f} ({naive['forward_share']:.0%}) |",
        f"| forwards (windows x rows) | {requests['windows'] * ROWS:,} | {naive['forwards']:,} |",
        f"| bytes asked of the checkpoint files / inputs | {s['asked_over_inputs']['ladder']:.2f} | "
        f"{s['asked_over_inputs']['naive']:.2f} |",
        f"| read from the device (start-up excluded) / inputs | {ladder['device_read_over_inputs']:.2f} | "
        f"{naive['device_read_over_inputs']:.2f} |",
        f"| merges written | 0 | {len(CARD_TS)} |",
        f"| peak anonymous memory of one process, GiB | {ladder['peak_anon_bytes'] / GIB:.2f} | "
        f"{naive['peak_anon_bytes'] / GIB:.2f} |",
        f"| acc and acc_norm, largest difference between the routes | {s['acc_largest_difference']:.1e} | |",
        "",
        f"The naive route took {s['speedup']:.2f}x the ladder's wall time.",
        "",
        "**MMLU on 4 x 70B** (Llama-2-70B shapes, 552 GB of bf16 input, base + 6 rungs, one GPU), every number "
        f"extrapolated: {MMLU_QUESTIONS:,} questions, one forward each; the 5-shot prompt's mean length "
        f"{MMLU_5_SHOT_CHARS:,.0f} characters (evalscope's MMLU statistics) at {CHARS_PER_TOKEN:g} characters per "
        f"token, zero-shot one sixth of it; {GPU_FLOP_SHARE:.0%} of an H100's published "
        f"{GPU_BF16_FLOPS / 1e12:.0f} bf16 TFLOP/s; an NVMe drive reading {NVME_READ_GB_S} GB/s and writing "
        f"{NVME_WRITE_GB_S} GB/s; hidden states in bf16, {GPU_BUDGET / GIB:.0f} GiB of GPU memory for them per pass.",
        "",
        "| MMLU | tokens per question | tokens forwarded per row | hidden states, GiB | passes | forwards, h | "
        "ladder, h | naive route, h |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["estimate_mmlu_70b"]:
        lines.append(f"| {r['shots']}-shot | {r['tokens_per_question']} | {r['tokens_forwarded_per_row']:,} | "
                     f"{r['hidden_gib']:,.0f} | {r['passes']} | {r['forward_h']:.1f} | {r['ladder_h']:.1f} | "
                     f"{r['naive_h']:.1f} |")
    lines += ["", "The naive route's rows assume the 138 GB merge fits the GPU's memory: more than an H100's 80 GB "
              "(an H200's 141 GB holds it, barely); the ladder holds one layer per row. At 5-shot the hidden "
              "states take many passes, each a read of the 552 GB of inputs: a larger budget (the GPU's free "
              "memory, `--memory-budget`) means fewer.",
              "", "Every number in the MMLU table is extrapolated; those above it are measured."]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--params", default=5e8, show_default=True, help="Parameters per checkpoint (run.py's quartet).")
@click.option("--items", default=100, show_default=True, help="Questions in the task.")
@click.option("--limit-gib", default=16.0, show_default=True, help="Each route's memory limit.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds before a route counts as hung.")
@click.option("--work", default=str(HERE / "work"), show_default=True, type=click.Path())
@click.option("--results", default=str(HERE / "results"), show_default=True, type=click.Path())
def main(params, items, limit_gib, timeout, work, results):
    """`ladder --task` and the naive route, side by side, from a cold disk."""
    import os

    started = time.perf_counter()
    check_cgroups()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # as ladder_streamed.py, for both routes alike
    work, results = Path(work).resolve(), Path(results).resolve()
    folders(work, results)
    paths = make_checkpoints(work, params)
    inputs = input_bytes(paths)
    limit = int(limit_gib * GIB)
    tasks = write_task(work / "tasks", items)
    recipe = write_recipe(paths, CARD_TS[0], work / "tasks-recipe.yml")
    report: Dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "shape": shape_of(paths[QUARTET[0]]),
                    "input_bytes": inputs, "checkpoint_bytes": input_bytes({"base": paths[QUARTET[0]]}),
                    "limit_bytes": limit, "items": items, "ts": list(CARD_TS),
                    "load": [os.getloadavg()[0]]}
    report["ladder"] = contender("ladder --task", work, limit, lambda cg: ladder_run(recipe, tasks, work, cg, timeout))
    write_json(results / "ladder_tasks.partial.json", report)
    report["naive"] = contender("naive route", work, limit, lambda cg: naive_run(paths, tasks, work, cg, timeout))
    report["load"].append(os.getloadavg()[0])
    report["summary"] = summarize(report)
    report["estimate_mmlu_70b"] = estimate_mmlu_70b()
    report["benchmark_s"] = time.perf_counter() - started
    write_results(results, "ladder_tasks", report, markdown(report))


if __name__ == "__main__":
    main()
