"""The chain on a CUDA GPU: the Triton kernel against the device's copy bandwidth, the
torch path and the stock formula, on a 70B's largest tensor; then `mergekit-yaml --cuda`
on the benchmark quartet.

    .venv/bin/python benchmarks/gpu.py          # writes benchmarks/results/gpu.json

Per dtype (bfloat16, float16, float32): four 8192 x 28672 inputs, three stages at
t = 0.0001, median of 5 after a warm-up, all in one process. chain_GBps counts the
bytes the chain must move (4 reads + 1 write); copy_GBps is a device-to-device copy of
one input (1 read + 1 write); extra_bytes is the device memory the chain took beyond
its inputs and its output; bitwise_equal_cpu compares the GPU's output with the CPU's.
Without a CUDA device (or without Triton) it says why on one line and exits 2,
writing nothing.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

ROWS, COLS = 8192, 28672
T = 1e-4
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def refuse(reason: str) -> None:
    click.echo(f"benchmarks/gpu.py: {reason}; nothing measured, no results written", err=True)
    sys.exit(2)


def device_line() -> str:
    """The GPU as `nvidia-smi -L` names it (its first line), else as torch names it."""
    try:
        lines = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                               timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        lines = []
    return lines[0].strip() if lines else torch.cuda.get_device_name()


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent)
    return result.stdout.strip() or "unknown"


def timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() over `repeats` runs after one warm-up, synchronised."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def measure_dtype(dtype: torch.dtype, repeats: int, rows: int, cols: int) -> dict:
    from harness import stock_nearswap_formula

    from nearswap_mergekit import nearswap_chain

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=gen) * 0.02
    cpu = [base.to(dtype)] + [(base + torch.randn(rows, cols, generator=gen) * 0.01).to(dtype)
                              for _ in range(3)]
    del base
    gpu = [x.cuda() for x in cpu]
    ts = [T] * 3
    size = gpu[0].numel() * gpu[0].element_size()

    def chain(backend):
        return lambda: nearswap_chain(gpu[0], gpu[1:], ts, backend=backend)

    copy_target = torch.empty_like(gpu[0])
    copy_s = timed(lambda: copy_target.copy_(gpu[0]), repeats)
    del copy_target
    chain_s = timed(chain("triton"), repeats)
    torch_path_s = timed(chain("torch"), repeats)
    stock_s = timed(lambda: stock_nearswap_formula(gpu[0], gpu[1:], T), repeats)

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = chain("triton")()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - size
    expected = nearswap_chain(cpu[0], cpu[1:], ts)
    chain_gbps = 5 * size / chain_s / 1e9
    copy_gbps = 2 * size / copy_s / 1e9
    return {
        "chain_s": chain_s,
        "chain_GBps": chain_gbps,
        "copy_GBps": copy_gbps,
        "chain_vs_copy": chain_gbps / copy_gbps,
        "torch_path_s": torch_path_s,
        "stock_formula_s": stock_s,
        "extra_bytes": int(extra),
        "bitwise_equal_cpu": same_bits(out.cpu(), expected),
    }


def mergekit_yaml_cuda(work: Path, params: float) -> dict:
    """`mergekit-yaml` with and without --cuda on the benchmark quartet: wall seconds
    and whether the outputs are bit-identical."""
    import yaml
    from harness import BIN, RECOMMENDED_FLAGS, make_checkpoints, offline_env, recipes
    from safetensors.torch import load_file

    paths = make_checkpoints(work, params)
    recipe = work / "recipe-gpu.yml"
    recipe.write_text(yaml.safe_dump_all(recipes(paths)["a"], sort_keys=False))
    result = {"params": params}
    outputs = {}
    for name, flags in (("cpu", []), ("cuda", ["--cuda"])):
        out = work / f"out-gpu-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        start = time.perf_counter()
        run = subprocess.run([str(BIN / "mergekit-yaml"), str(recipe), str(out), *RECOMMENDED_FLAGS,
                              *flags], capture_output=True, text=True, env=offline_env())
        if run.returncode:
            raise click.ClickException(f"mergekit-yaml {' '.join(flags)} failed:\n{run.stderr[-2000:]}")
        result[f"{name}_s"] = time.perf_counter() - start
        outputs[name] = {}
        for file in sorted(out.glob("*.safetensors")):
            outputs[name].update(load_file(str(file)))
    result["bitwise_equal_cpu"] = outputs["cpu"].keys() == outputs["cuda"].keys() and all(
        same_bits(outputs["cpu"][n], outputs["cuda"][n]) for n in outputs["cpu"])
    return result


@click.command()
@click.option("--repeats", default=5, show_default=True)
@click.option("--params", default=5e8, show_default=True,
              help="Parameters per checkpoint of the quartet for mergekit-yaml --cuda.")
@click.option("--skip-merge", is_flag=True, help="Only the kernel on the 70B-shaped tensor.")
@click.option("--work", default=str(Path(__file__).resolve().parent / "work"), show_default=True,
              type=click.Path())
@click.option("--results", default=str(Path(__file__).resolve().parent / "results"),
              show_default=True, type=click.Path())
def main(repeats, params, skip_merge, work, results):
    if not torch.cuda.is_available():
        refuse(f"no CUDA device (torch {torch.__version__} sees none)")
    from nearswap_mergekit.method import _triton

    if not _triton.available():
        refuse("the Triton kernel cannot run here (Triton missing, or "
               f"{_triton.BACKEND_VARIABLE}=torch)")
    import triton
    from harness import write_json

    report = {"device": device_line(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": commit(), "shape": [ROWS, COLS], "dtypes": {}}
    for name, dtype in DTYPES.items():
        report["dtypes"][name] = measure_dtype(dtype, repeats, ROWS, COLS)
        torch.cuda.empty_cache()
        click.echo(f"{name}: {report['dtypes'][name]}")
    if not skip_merge:
        work_dir = Path(work)
        work_dir.mkdir(parents=True, exist_ok=True)
        report["mergekit_yaml_cuda"] = mergekit_yaml_cuda(work_dir, params)
    results_dir = Path(results)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / "gpu.json", report)
    click.echo("| dtype | chain | GB/s (4 reads + 1 write) | device copy | chain / copy | torch path "
               "| stock formula | extra bytes | CPU's bits |")
    click.echo("|---|---|---|---|---|---|---|---|---|")
    for name, row in report["dtypes"].items():
        click.echo(f"| {name} | {row['chain_s'] * 1e3:.1f} ms | {row['chain_GBps']:,.0f} | "
                   f"{row['copy_GBps']:,.0f} GB/s | {row['chain_vs_copy']:.1%} | "
                   f"{row['torch_path_s'] * 1e3:.1f} ms | {row['stock_formula_s'] * 1e3:.1f} ms | "
                   f"{row['extra_bytes']:,} | {row['bitwise_equal_cpu']} |")


if __name__ == "__main__":
    main()
