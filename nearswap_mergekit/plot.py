"""PNG plots of a `stats` report (matplotlib, an optional extra)."""

from __future__ import annotations


def plot_report(report: dict, path: str) -> None:
    """Full-swap fraction per layer for each stage; the t ladder when several t were given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

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
            label=f"stage {index}: {stage['model'].rsplit('/', 1)[-1]}",
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
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
