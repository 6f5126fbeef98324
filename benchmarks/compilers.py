"""The fused kernel's throughput with each C compiler, against the torch path.

    .venv/bin/python benchmarks/compilers.py      # writes benchmarks/results/compilers.md

Builds with gcc, clang and gcc-11 where installed, with the default flags
(-march=native) and, on x86, with -march=x86-64 (no F16C: the software float16
conversion), each into its own empty cache folder. All builds are loaded into
this one process and timed in turn with the torch path, alternated, on the same
four 8192 x 8192 inputs, three stages; GB/s of input is the four inputs' bytes
over the median wall time of 3 runs.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import statistics
import tempfile
from datetime import date

import click
import torch
from harness import HERE, cpu_model, seconds, write_markdown

from nearswap_mergekit.method import _fused
from nearswap_mergekit import nearswap_chain

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COMPILERS = ["gcc", "clang", "gcc-11"]
T = [1e-4, 1e-3, 1e-2]


def inputs(size: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(size, size, generator=gen) * 0.02
    secondaries = [(base + torch.randn(size, size, generator=gen) * 0.01).to(dtype) for _ in T]
    return base.to(dtype), secondaries


def build(compiler: str, cflags, cache: str):
    """(library, build info) for one compiler and flag override, built as _fused does."""
    saved = {name: os.environ.get(name) for name in ("CC", _fused.CFLAGS_VARIABLE, "XDG_CACHE_HOME")}
    os.environ.update({"CC": compiler, "XDG_CACHE_HOME": cache})
    if cflags is not None:
        os.environ[_fused.CFLAGS_VARIABLE] = cflags
    else:
        os.environ.pop(_fused.CFLAGS_VARIABLE, None)
    try:
        library, info = _fused._build()
        return _fused._declare(library), info
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def runner(library, backend: str):
    def run(base, secondaries):
        if library is not None:  # the fused path calls whichever build is loaded
            _fused._library, _fused._tried = library, True
        return nearswap_chain(base, secondaries, T, backend=backend)

    return run


def machine() -> str:
    cpu = cpu_model(platform.processor() or platform.machine())
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}"


def measure(contenders: dict, size: int, repeats: int):
    """GB/s of input and an output digest, per contender and dtype."""
    speeds, digests = {key: {} for key in contenders}, {key: {} for key in contenders}
    for name, dtype in DTYPES.items():
        base, secondaries = inputs(size, dtype)
        gigabytes = sum(x.numel() * x.element_size() for x in (base, *secondaries)) / 1e9
        times = {key: [] for key in contenders}
        for key, (_, run) in contenders.items():  # warm up; one output per build
            digests[key][name] = hashlib.sha256(run(base, secondaries).view(torch.uint8).numpy()).hexdigest()
        for _ in range(repeats):  # alternate the contenders
            for key, (_, run) in contenders.items():
                times[key].append(seconds(run, base, secondaries))
        for key in contenders:
            speeds[key][name] = gigabytes / statistics.median(times[key])
        click.echo(f"{name}: " + ", ".join(f"{k[0]} {v[name]:.2f}" for k, v in speeds.items()))
        del base, secondaries
    return speeds, digests


@click.command()
@click.option("--size", default=8192, show_default=True, help="rows = columns of each input")
@click.option("--repeats", default=3, show_default=True)
def main(size: int, repeats: int):
    os.environ.pop(_fused.BACKEND_VARIABLE, None)
    with tempfile.TemporaryDirectory() as caches:
        contenders = {}
        for compiler in COMPILERS:
            if shutil.which(compiler) is None:
                click.echo(f"{compiler}: not installed, skipped")
                continue
            variants = [None]
            if platform.machine() in ("x86_64", "AMD64"):
                variants.append("-march=x86-64")
            for cflags in variants:
                library, info = build(compiler, cflags, tempfile.mkdtemp(dir=caches))
                contenders[(compiler, " ".join(info["flags"]))] = (info, runner(library, "fused"))
        contenders[("torch path", "")] = (None, runner(None, "torch"))
        load_before = os.getloadavg()[0]
        speeds, digests = measure(contenders, size, repeats)
        load_after = os.getloadavg()[0]

    reference = digests[("torch path", "")]
    lines = [
        f"Measured {date.today()} on {machine()}; 1-minute load average {load_before:.2f} "
        f"before, {load_after:.2f} after (other work on the machine slows the torch path's "
        "threads most).",
        "",
        f"Four {size} x {size} inputs, three stages at t = {', '.join(map(str, T))}; GB/s of input "
        f"(the four inputs' bytes / wall time), median of {repeats}, contenders alternated. "
        "\"same bits\": the output equals the torch path's bit for bit.",
        "",
        "| build | compiler | flags | F16C | " + " | ".join(DTYPES) + " | same bits |",
        "|---|---|---|:---:|" + "---:|" * len(DTYPES) + ":---:|",
    ]
    for key, (info, _) in contenders.items():
        row = " | ".join(f"{speeds[key][d]:.2f}" for d in DTYPES)
        same = "yes" if digests[key] == reference else "NO"
        if info is None:
            lines.append(f"| {key[0]} |  |  |  | {row} | {same} |")
        else:
            f16c = "yes" if "__F16C__" in info["macros"] else "no"
            lines.append(f"| fused, {key[0]} | {info['version']} | {key[1]} | {f16c} | {row} | {same} |")
    (HERE / "results").mkdir(exist_ok=True)
    write_markdown(HERE / "results" / "compilers.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
