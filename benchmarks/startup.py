"""Start-up cost of the installed hook and of the CLI: a fresh venv, before and after
installing the wheel.

    .venv/bin/python benchmarks/startup.py

Prints `python -X importtime -c pass` totals and the hook's own line, the median
wall time of `python -c pass` without and with the plugin, and that of
`nearswap-mergekit --help` (goal: under HELP_GOAL_S), all measured alternately.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = 60
#: `nearswap-mergekit --help` should answer within this (it imports no torch).
HELP_GOAL_S = 0.5


def python_in(venv: Path) -> str:
    return str(venv / "bin" / "python")


def importtime(python: str) -> dict:
    """Cumulative microseconds per module imported at start-up (.pth imports sit under site)."""
    err = subprocess.run([python, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
    rows = {}
    for line in err.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            rows[match.group(4)] = int(match.group(2))
    return rows


def wall(command: list) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(scratch / "dist"), str(REPO)], check=True)
        (wheel,) = (scratch / "dist").glob("*.whl")
        venvs = {name: scratch / name for name in ("without", "with")}
        for name, venv in venvs.items():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            site = subprocess.run([python_in(venv), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
            Path(site, "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([python_in(venvs["with"]), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], check=True)
        commands = {name: [python_in(venv), "-c", "pass"] for name, venv in venvs.items()}
        commands["help"] = [str(venvs["with"] / "bin" / "nearswap-mergekit"), "--help"]
        times = {name: [] for name in commands}
        for _ in range(RUNS):  # alternate
            for name, command in commands.items():
                times[name].append(wall(command))
        imports = {name: importtime(python_in(venv)) for name, venv in venvs.items()}
    hook = imports["with"].get("nearswap_mergekit_hook", 0)
    print(f"python -X importtime -c pass: nearswap_mergekit_hook {hook} us "
          f"(site: {imports['without'].get('site', 0)} us without, {imports['with'].get('site', 0)} us with)")
    for name in venvs:
        print(f"python -c pass, {name} the plugin: median {1e3 * statistics.median(times[name]):.2f} ms "
              f"over {RUNS} runs")
    delta = statistics.median(times["with"]) - statistics.median(times["without"])
    print(f"difference of medians: {1e3 * delta:+.2f} ms")
    help_s, pass_s = statistics.median(times["help"]), statistics.median(times["with"])
    print(f"nearswap-mergekit --help: median {1e3 * help_s:.1f} ms over {RUNS} runs, "
          f"{help_s / pass_s:.1f}x python -c pass; goal < {1e3 * HELP_GOAL_S:.0f} ms: "
          f"{'met' if help_s < HELP_GOAL_S else 'NOT met'}")


if __name__ == "__main__":
    main()
