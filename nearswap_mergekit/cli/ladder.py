"""`nearswap-mergekit ladder`: score a ladder of t on your own text, writing no model."""

from __future__ import annotations

from pathlib import Path

import click

from nearswap_mergekit.cli.common import (
    BadInput,
    check_target_swap,
    check_ts,
    hide_progress_bars,
    load_plan,
    parse_size,
    planning_options,
    reading,
    require_matplotlib,
    rewriting,
    write_json,
)
from nearswap_mergekit.ladder import EVAL_DTYPES


def _check_ladder_method(recipe: str) -> None:
    """A recipe for another merge method is bad input for `ladder` (said before planning)."""
    import yaml

    from nearswap_mergekit.method.spec import METHOD_NAME

    try:
        data = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # planning says what is wrong with the file
    method = data.get("merge_method") if isinstance(data, dict) else None
    if method is not None and method != METHOD_NAME:
        raise BadInput(
            f"recipe {recipe!r} uses merge_method {method!r}; ladder scores {METHOD_NAME!r} "
            f"recipes: write merge_method: {METHOD_NAME}"
        )


def _check_size(_ctx, _param, value):
    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    if size <= 0:
        raise click.BadParameter(f"must be more than 0 bytes; got {value!r}")
    return size


def _ladder_table(report: dict) -> list:
    """The report as one table per text."""
    lines = []
    width = max(14, *(len(rung["label"]) for rung in report["rungs"]))
    for index, text in enumerate(report["texts"]):
        lines += [
            "",
            f"{text['path']}: {text['bytes']:,} bytes, {text['tokens']:,} tokens, context {report['context']}",
            f"{'rung':<{width}}  {'t':>9}  {'full swap':>9}  {'perplexity':>10}  {'bits/byte':>9}  "
            f"{'KL from base':>12}  {'top-1 agree':>11}",
        ]
        for rung in report["rungs"]:
            scores = rung["texts"][index]
            swap = rung["full_swap"]
            swap_text = f"{100 * sum(swap) / len(swap):8.3f}%" if swap else f"{'':>9}"
            t_text = f"{rung['t']:>9.3g}" if rung["t"] is not None else f"{'':>9}"
            lines.append(
                f"{rung['label']:<{width}}  {t_text}  {swap_text}  {scores['perplexity']:>10.4f}  "
                f"{scores['bits_per_byte']:>9.5f}  {scores['kl_from_base']:>12.3e}  "
                f"{100 * scores['top1_agreement']:>10.2f}%"
            )
    if "task_settings" in report:
        lines += _task_table(report)
    lines.append("")
    lines.append(
        f"full swap: % of weights fully swapped per pass (mean over stages); "
        f"{report['batches']} forward(s) per rung; {report['bytes_read']:,} bytes read; "
        f"peak {report['peak_bytes_held']:,} bytes of merged weights held; {report['wall_seconds']:.1f} s"
    )
    if report["path"] == "layers":
        lines.append(f"streamed layer by layer: {report['passes']} pass(es) over the inputs; hidden states "
                     f"{report['hidden_state_bytes']:,} bytes at most (budget {report['memory_budget']:,})")
    else:
        lines.append(f"{report['path']}: the inputs are read once per batch")
    return lines


def _task_request(names, include_path, limit, num_fewshot):
    """The --task flags, checked (lm-eval installed, --limit); None without --task."""
    if not names:
        given = [flag for flag, value in (("--include-path", include_path), ("--limit", limit),
                                          ("--num-fewshot", num_fewshot)) if value is not None]
        if given:
            raise BadInput(f"{given[0]} is for --task: give --task NAME too")
        return None
    from nearswap_mergekit.ladder import tasks

    try:
        tasks.require_lm_eval()
        limit = tasks.check_limit(limit)
    except tasks.TaskError as error:
        raise BadInput(str(error)) from None
    return tasks.TaskRequest(list(dict.fromkeys(names)), include_path, limit, num_fewshot)


def _replay_tasks(report: dict, request_set, task_request, manager) -> None:
    """Each row's lm-eval results (tasks.replay), under rungs[i]["tasks"]."""
    from nearswap_mergekit.ladder import tasks

    scores = report.pop("request_scores")
    for row, scored in zip(report["rungs"], scores):
        try:
            row["tasks"] = tasks.replay(task_request, manager, request_set.answers(scored))
        except Exception as error:  # lm-eval's metrics, filters or aggregation on these answers
            raise click.ClickException(f"lm-eval's results for {row['label']} failed: "
                                       f"{type(error).__name__}: {error}") from None
    report["task_settings"] = {"tasks": list(task_request.names), "include_path": task_request.include_path,
                               "limit": task_request.limit, "num_fewshot": task_request.num_fewshot}


def _task_table(report: dict) -> list:
    """Each task's metrics per rung, with their stderr where lm-eval gives one."""
    from nearswap_mergekit.ladder import tasks

    rows = report["rungs"]
    width = max(14, *(len(rung["label"]) for rung in rows))
    settings = report["task_settings"]
    lines = ["", f"lm-eval tasks ({report['requests']['loglikelihood']:,} loglikelihood and "
             f"{report['requests']['loglikelihood_rolling']:,} rolling requests, "
             f"{report['requests']['pairs']:,} scored in {report['requests']['windows']:,} forwards, "
             f"model length {report['requests']['max_length']}; "
             f"num_fewshot {settings['num_fewshot'] if settings['num_fewshot'] is not None else 'default'}, "
             f"limit {settings['limit'] if settings['limit'] is not None else 'none'})"]
    by_task: dict = {}
    for task, key, stderr in tasks.main_metrics(rows[0]["tasks"]):
        by_task.setdefault(task, []).append((key, stderr))
    for task, metrics in by_task.items():
        header = "".join(f"  {key:>24}" for key, _ in metrics)
        lines += [f"{task}", f"{'rung':<{width}}  {'t':>9}  {'full swap':>9}{header}"]
        for rung in rows:
            swap = rung["full_swap"]
            swap_text = f"{100 * sum(swap) / len(swap):8.3f}%" if swap else f"{'':>9}"
            t_text = f"{rung['t']:>9.3g}" if rung["t"] is not None else f"{'':>9}"
            values = rung["tasks"].get(task, {})
            cells = ""
            for key, stderr in metrics:
                value, error = values.get(key), values.get(stderr)
                text = f"{value:.4f}" if isinstance(value, (int, float)) else str(value)
                if isinstance(error, (int, float)):
                    text += f" ± {error:.4f}"
                cells += f"  {text:>24}"
            lines.append(f"{rung['label']:<{width}}  {t_text}  {swap_text}{cells}")
    return lines


def _recipe_metrics(results) -> list:
    """The task metrics a rung's recipe header names: acc, acc_norm, bits per byte."""
    if not results:
        return []
    from nearswap_mergekit.ladder import tasks

    return [m for m in tasks.main_metrics(results) if m[1].partition(",")[0] in ("acc", "acc_norm", "bits_per_byte")]


def _rung_recipe_name(recipe: str, label: str) -> str:
    slug = label.replace("=", "").replace("%", "pct").replace(" ", "")
    return f"{Path(recipe).stem}-{slug}.yml"


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--text", "texts", multiple=True, metavar="FILE",
              help="A UTF-8 text file to score every rung on; repeat for several.")
@click.option("--task", "task_names", multiple=True, metavar="NAME",
              help="An lm-evaluation-harness task, group or tag to run on every rung (its "
              "log-likelihood requests, scored in the same pass as the texts); repeat. Needs "
              "nearswap-mergekit[eval].")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="A folder of your own lm-eval task YAML files (as lm_eval --include_path).")
@click.option("--limit", type=float, metavar="N",
              help="Documents per --task (as lm_eval --limit: a count, or a share below 1).")
@click.option("--num-fewshot", type=click.IntRange(min=0), metavar="K",
              help="Few-shot examples per --task document (as lm_eval --num_fewshot).")
@click.option("--t", "ts", multiple=True, metavar="T", callback=check_ts,
              help="A rung with this t for every stage (as `stats --t`); repeat for a ladder.")
@click.option("--target-swap", "targets", multiple=True, metavar="FRACTION", callback=check_target_swap,
              help="A rung at calibrate's global t for this share of weights fully swapped per "
              "pass: a fraction (0.008) or a percentage (0.8%); repeat; combines with --t. "
              "Without --t and --target-swap: the recipe's own t.")
@click.option("--context", type=int, metavar="N",
              help="Positions per window, the BOS included (default: 2048, or the model's "
              "max_position_embeddings where smaller).")
@click.option("--batch", type=click.IntRange(min=1), metavar="N",
              help="Windows per forward (default: all windows of one length at once). The base "
              "row, each rung and each --with-inputs row hold their batch's log-probabilities until "
              "it is scored: rows x N x context x vocabulary x 4 bytes.")
@click.option("--eval-dtype", type=click.Choice(EVAL_DTYPES),
              help="dtype the model runs in (default: float32 on the CPU, the recipe's dtype "
              "on CUDA); the log-softmax is float32 whatever it is.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the weights are merged and the forwards run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG: bits per byte and KL from the base against the full-swap %.")
@click.option("--recipes", "recipes_dir", type=click.Path(file_okay=False),
              help="Write one recipe per --t or --target-swap rung into this folder, its t as "
              "the global t, ready for mergekit-yaml.")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Also continue this prompt greedily with every rung; repeat. Slow: every "
              "generated token is a full forward that reads and merges every weight again.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Tokens generated per --prompt.")
@click.option("--with-inputs", is_flag=True,
              help="Also score each secondary alone (vocabulary-aligned, as the chain reads it): "
              "reference rows, after the rungs, in the table and --json (not in --plot).")
@click.option("--memory-budget", "memory_budget", metavar="SIZE", callback=_check_size,
              help="Bytes the hidden states may take between layers (8G, 512MiB, ...); the windows "
              "are split into the fewest passes that fit, each reading the inputs once. Default: "
              "half of the memory available at the start (on CUDA, of the GPU's free memory).")
@click.option("--whole-model", is_flag=True,
              help="Run the whole model per batch instead of layer by layer (reads every input "
              "weight once per batch): the engine of earlier versions, for comparison.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@planning_options
def ladder(recipe, texts, task_names, include_path, limit, num_fewshot, ts, targets, context, batch, eval_dtype, device, json_path, plot_path,
           recipes_dir, prompts, max_new_tokens, with_inputs, memory_budget, whole_model, quiet, **flags):
    """Score a ladder of t on your own text, and write no model: per rung, the
    perplexity and bits per byte of each --text, the KL from the base and top-1
    agreement with it, and the full-swap fraction per stage.

    Each rung's model is the one mergekit-yaml would write for RECIPE at that t.
    Llama, Mistral and Qwen2 models are streamed layer by layer: each layer's
    inputs are read once, merged for the base row (t = 0) and every rung, and
    every window runs through it before the next layer is read (in passes that
    fit --memory-budget); other families run whole per batch, each weight merged
    as the forward reaches it. The scoring rule: python -m pydoc
    nearswap_mergekit.ladder.scoring.

    --task runs lm-evaluation-harness tasks (log-likelihood ones: multiple choice,
    perplexity) on every rung in the same pass: lm-eval records the requests, the
    ladder scores them as lm-eval's hf backend would, and lm-eval computes each
    rung's results from those answers (docs/lm-eval.md).

    \b
    nearswap-mergekit ladder quartet.yml --text notes.txt --target-swap 0.8% --target-swap 10% --t 0.0025
    nearswap-mergekit ladder quartet.yml --task arc_easy --num-fewshot 5 --limit 200 --t 0.0001 --t 0.001
    """
    hide_progress_bars(quiet)
    from nearswap_mergekit.ladder import engine, scoring
    from nearswap_mergekit.ladder import setup as ladder_setup
    from nearswap_mergekit.ladder.output import execution_device
    from nearswap_mergekit.ladder.rungs import LadderError
    from nearswap_mergekit.tools import recipewriter

    # bad input first: nothing is planned, read or written before these pass
    task_request = _task_request(task_names, include_path, limit, num_fewshot)
    if not texts and not task_names:
        raise BadInput("nothing to score: give --text FILE or --task NAME (or both)")
    try:
        contents = [scoring.read_text(path) for path in texts]
    except scoring.TextError as error:
        raise BadInput(str(error)) from None
    if context is not None and context < 2:
        raise BadInput(f"--context {context}: a window needs 2 positions or more (one to "
                        "condition on, one to score)")
    try:
        execution_device(device)
    except LadderError as error:
        raise BadInput(str(error)) from None
    if recipes_dir:
        if not (ts or targets):
            raise click.UsageError("--recipes writes one recipe per --t or --target-swap rung; give one of those")
        if Path(recipes_dir).exists() and not Path(recipes_dir).is_dir():
            raise BadInput(f"--recipes {recipes_dir}: not a folder")
        # A recipe that cannot be rewritten: say so before the long part (checked
        # beside the recipe where the folder is still to be made).
        folder = Path(recipes_dir) if Path(recipes_dir).is_dir() else Path(recipe).parent
        with rewriting():
            recipewriter.build_recipe(recipe, str(folder / _rung_recipe_name(recipe, "check")), None, 0.0)
    if plot_path:
        require_matplotlib()
    _check_ladder_method(recipe)
    plan = load_plan(recipe, flags)
    if not plan.jobs:
        raise click.ClickException(f"{recipe}: no tensor has both a base and a secondary")
    manager = records = None
    if task_request is not None:  # lm-eval's requests, recorded before any weight is read
        from nearswap_mergekit.ladder import tasks

        try:
            manager = tasks.task_manager(task_request)
            tasks.load_tasks(task_request, manager)
            records = tasks.record(task_request, manager)
        except tasks.TaskError as error:
            raise BadInput(str(error)) from None
    request = ladder_setup.Request(
        texts=texts, contents=contents, ts=ts, targets=targets, context=context, batch=batch,
        eval_dtype=eval_dtype, device=device, prompts=prompts, max_new_tokens=max_new_tokens,
        with_inputs=with_inputs, progress=not quiet, memory_budget=memory_budget, whole_model=whole_model,
        records=records,
    )
    problem = None
    with reading(recipe):
        try:
            setup, rungs, references = ladder_setup.prepare(plan, request)
        except LadderError as error:  # reading would take it for a failure
            problem = str(error)
    if problem:
        raise BadInput(problem)
    try:
        report = engine.run(setup, rungs + references)
    except LadderError as error:
        raise BadInput(str(error)) from None
    except Exception as error:  # unreadable inputs, out of memory, a model transformers cannot run
        raise click.ClickException(f"ladder on {recipe} failed: {type(error).__name__}: {error}") from None
    if task_request is not None:
        _replay_tasks(report, setup.requests, task_request, manager)
    for line in _ladder_table(report):
        click.echo(line)
    for rung in report["rungs"] if prompts else ():
        for item in rung["continuations"]:
            click.echo(f"{rung['label']}: {item['prompt']!r} -> {item['continuation']!r}")
    write_json(json_path, report)
    if plot_path:
        from nearswap_mergekit.cli.plot import plot_ladder

        plot_ladder(report, plot_path)
        click.echo(f"wrote {plot_path}")
    if recipes_dir:
        Path(recipes_dir).mkdir(parents=True, exist_ok=True)
        for rung, row in zip(rungs, report["rungs"][1:]):
            path = str(Path(recipes_dir) / _rung_recipe_name(recipe, rung.label))
            scores = "; ".join([f"{Path(s['path']).name}: {s['bits_per_byte']:.5f} bits/byte, KL "
                                f"{s['kl_from_base']:.3e}" for s in row["texts"]]
                               + [f"{task} {key}: {row['tasks'][task][key]:.4f}"
                                  for task, key, _ in _recipe_metrics(row.get("tasks"))])
            header = (f"{recipe} with one global t = {rung.t:.6g}: the rung {rung.label!r} of "
                      f"nearswap-mergekit ladder\n{scores}")
            with rewriting():
                recipewriter.write_recipe(recipe, path, None, rung.t, header)
            click.echo(f"wrote {path}")
