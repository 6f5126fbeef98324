"""PNG plots of `stats` and `calibrate` results (matplotlib, an optional extra)."""

from __future__ import annotations

from typing import List


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str) -> None:
    plt = _pyplot()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _short(model: str) -> str:
    return model.rsplit("/", 1)[-1]


def plot_report(report: dict, path: str) -> None:
    """Full-swap fraction per layer for each stage; the t ladder when several t were given."""
    import matplotlib.ticker

    plt = _pyplot()
    results = report["results"]
    ladder = len(results) > 1
    figure, axes = plt.subplots(1, 2 if ladder else 1, figsize=(12 if ladder else 7, 4.5))
    axes = list(axes) if ladder else [axes]
    first = results[0]
    for index, stage in enumerate(first["stages"], 1):
        layers = [row for row in stage["layers"] if row["layer"] is not None]
        axes[0].plot(
            [row["layer"] for row in layers],
            [100 * row["full_swap_fraction"] for row in layers],
            marker="o",
            label=f"stage {index}: {_short(stage['model'])}",
        )
    label = "recipe's t" if first["t"] is None else f"t = {first['t']:g}"
    axes[0].set(xlabel="layer", ylabel="% fully swapped", title=f"Full swap per layer ({label})")
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    if ladder:
        ts = [result["t"] for result in results]
        for index in range(len(first["stages"])):
            axes[1].plot(ts, [100 * r["stages"][index]["full_swap_fraction"] for r in results],
                         marker="o", label=f"stage {index + 1}")
        axes[1].set(xscale="log", xlabel="t", ylabel="% fully swapped per pass", title="t ladder")
        axes[1].legend(fontsize=8)
    _save(figure, path)


def plot_calibration(result: dict, curves: List[dict], path: str) -> None:
    """Per stage, the full-swap fraction against t (earlier stages at their chosen
    t), each stage's chosen t marked, the target and the global t drawn across.

    `result` is `calibrate`'s; `curves[k]` holds stage k's measured "t" and
    "full_swap_fraction" lists. Both axes are logarithmic: points at t = 0 or a
    fraction of 0 are left out.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (stage, curve) in enumerate(zip(result["stages"], curves), 1):
        points = [(t, 100 * f) for t, f in zip(curve["t"], curve["full_swap_fraction"]) if t > 0 and f > 0]
        ts, percents = [t for t, _ in points], [p for _, p in points]
        (line,) = axis.plot(ts, percents, marker="o", markersize=3,
                            label=f"stage {index}: {_short(stage['model'])}, t = {stage['t']:.4g}")
        if stage["t"] > 0 and stage["achieved_full_swap_fraction"] > 0:
            axis.plot(stage["t"], 100 * stage["achieved_full_swap_fraction"], marker="*",
                      markersize=14, color=line.get_color(), markeredgecolor="black")
    axis.axhline(100 * result["target"], color="grey", linestyle="--", linewidth=1,
                 label=f"target {100 * result['target']:g}%")
    if result["global_t"] > 0:
        axis.axvline(result["global_t"], color="grey", linestyle=":", linewidth=1,
                     label=f"global t = {result['global_t']:.4g}")
    axis.set(xscale="log", yscale="log", xlabel="t", ylabel="% fully swapped per pass",
             title="Full swap against t per stage (chosen t starred)")
    axis.legend(fontsize=8)
    _save(figure, path)


def plot_ladder(report: dict, path: str) -> None:
    """PNG: bits per byte per text, and KL from the base, against the % of weights
    fully swapped per pass (mean over stages); the base as a dotted line. With
    --task, a row of panels below: each task's metrics (error bars: lm-eval's
    stderr) against the same axis."""
    from pathlib import Path

    import matplotlib.ticker

    plt = _pyplot()
    base, *rungs = report["rungs"]
    rungs = sorted((r for r in rungs if r["full_swap"]), key=lambda r: sum(r["full_swap"]))
    swapped = [100 * sum(r["full_swap"]) / len(r["full_swap"]) for r in rungs]
    task_names = list(base.get("tasks", {}))
    texts = bool(report["texts"]) or not task_names
    columns = max(2 if texts else 1, len(task_names))
    rows = int(texts) + bool(task_names)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.5 * rows), squeeze=False)
    left, right = (axes[0][0], axes[0][1]) if texts else (None, None)
    for axis in axes[0][2:] if texts else ():
        axis.set_visible(False)
    task_axes = list(axes[-1]) if task_names else []
    for axis, task in zip(task_axes, task_names):
        _plot_task(axis, task, base, rungs, swapped)
    for axis in task_axes[len(task_names):]:
        axis.set_visible(False)
    for index, text in enumerate(report["texts"] if texts else ()):
        name = Path(text["path"]).name
        bits = [r["texts"][index]["bits_per_byte"] for r in rungs]
        (line,) = left.plot(swapped, bits, marker="o", label=name)
        left.axhline(base["texts"][index]["bits_per_byte"], color=line.get_color(), linestyle=":",
                     linewidth=1.2, label=f"{name}: base")
        kl = [r["texts"][index]["kl_from_base"] for r in rungs]
        right.plot(swapped, kl, marker="o", color=line.get_color(), label=name)
        if index == 0:  # name each rung once, beside the first text's points
            for rung, x, y_bits, y_kl in zip(rungs, swapped, bits, kl):
                for axis, y in ((left, y_bits), (right, y_kl)):
                    axis.annotate(rung["label"], (x, y), textcoords="offset points", xytext=(4, 4),
                                  fontsize=7, color="grey")
    if texts:
        right.axhline(0.0, color="grey", linestyle=":", linewidth=1.2, label="base")
        left.set(ylabel="bits per byte", title="Bits per byte against full swap")
        right.set(ylabel="KL(base || rung) per token, nats", title="KL from the base")
    for axis in [left, right] * texts + task_axes[: len(task_names)]:
        if swapped and min(swapped) > 0:
            axis.set_xscale("log")
            axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("% fully swapped per pass (mean over stages)")
        axis.legend(fontsize=8)
    _save(figure, path)


def _plot_task(axis, task: str, base: dict, rungs: List[dict], swapped: List[float]) -> None:
    """One task's main metrics per rung (lm-eval's stderr as error bars), the base
    dotted: acc and acc_norm where it has them, else bits per byte, else its first."""
    found = [key for key, value in base["tasks"][task].items()
             if "," in key and "_stderr," not in key and isinstance(value, (int, float))]
    chosen = ([k for k in found if k.partition(",")[0] in ("acc", "acc_norm")]
              or [k for k in found if k.partition(",")[0] == "bits_per_byte"] or found[:1])
    for key in chosen:
        value = base["tasks"][task][key]
        metric, _, filt = key.partition(",")
        values = [r["tasks"][task].get(key) for r in rungs]
        errors = [r["tasks"][task].get(f"{metric}_stderr,{filt}") for r in rungs]
        errors = errors if all(isinstance(e, (int, float)) for e in errors) else None
        line = axis.errorbar(swapped, values, yerr=errors, marker="o", capsize=3, label=key)
        axis.axhline(value, color=line[0].get_color(), linestyle=":", linewidth=1.2, label=f"{key}: base")
    axis.set(ylabel=task, title=f"{task} (lm-eval) against full swap")
