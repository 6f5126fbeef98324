"""What the benchmark scripts share: their paths and constants, the benchmark quartet
(checkpoints and recipes), child processes and timers, memory cgroups and polling of
anonymous memory, page-cache eviction, the machine's description, and writing results.

Not a script: the scripts beside it import it (`python benchmarks/X.py` puts this
folder first on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import click
import torch

from nearswap_mergekit.tiny import QUARTET, TinyLlama, build_family

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
GIB = 2**30
#: The benchmark recipes' t (configs/quartet.yml's).
T = 1e-4
#: mergekit-yaml's write options recommended for a NearSwap chain.
RECOMMENDED_FLAGS = ["--async-write", "--write-threads", "2", "--out-shard-size", "1B"]
#: A 70B Llama in float16 (QuartetAnemoi's models), and the NVMe drive the estimates
#: assume (as docs/performance.md does).
SEVENTY_B_GB = 138.0
NVME_READ_GB_S, NVME_WRITE_GB_S = 3.0, 2.0


# --- the machine ---------------------------------------------------------------------------


def cpu_model(default: Optional[str] = None) -> str:
    """The CPU's model name from /proc/cpuinfo, else `default` (platform.processor())."""
    default = platform.processor() if default is None else default
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return default
    return next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), default)


def machine() -> str:
    """The machine in one line: cores, CPU, RAM, torch."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu_model()}), {memory:.0f} GiB RAM, torch {torch.__version__}"


# --- child processes and timers ------------------------------------------------------------


def offline_env(**extra: str) -> Dict[str, str]:
    """This process's environment for a child, with the Hub offline (every model is local)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def in_cgroup(command: Sequence[str], cgroup: MemoryCgroup) -> List[str]:
    """`command` run in `cgroup`: the shell joins the cgroup, then becomes the command."""
    return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup.procs_file), *command]


def run_child(command: Sequence[str], what: str, tail: int = 2000,
              **kwargs) -> Tuple[subprocess.CompletedProcess, float]:
    """Run `command`, output captured as text: (result, wall seconds); ClickException if it fails."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    wall = time.perf_counter() - start
    if result.returncode:
        raise click.ClickException(f"{what} failed:\n{result.stderr[-tail:]}")
    return result, wall


def seconds(fn: Callable, *args) -> float:
    """Wall seconds of one call of fn(*args)."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def read_bytes() -> int:
    """Bytes this process (all its threads) caused to be read from a block device."""
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(": ")
        if key == "read_bytes":
            return int(value)
    return 0


def rss_anon(pid: int) -> Optional[int]:
    """A process's anonymous resident memory in bytes (RssAnon); None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return 0


def descendants(pid: int) -> List[int]:
    """pid and every process below it (from /proc/PID/task/*/children)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                queue += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


# --- the page cache ------------------------------------------------------------------------


def evict(paths: Sequence[Path]) -> None:
    """Drop the files' clean pages from the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_page_cache(folder: Path) -> str:
    """Evict `folder`'s files from the page cache, so the next run reads the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        evict([path for path in folder.rglob("*") if path.is_file()])
        return "posix_fadvise(DONTNEED)"


# --- checkpoints and recipes ---------------------------------------------------------------


def checkpoint_files(paths: Dict[str, object]) -> List[Path]:
    """The .safetensors files of the checkpoints in `paths` (name -> folder), sorted."""
    return sorted(f for path in paths.values() for f in Path(path).glob("*.safetensors"))


def input_bytes(paths: Dict[str, object]) -> int:
    """Bytes of the checkpoints' .safetensors files together."""
    return sum(f.stat().st_size for f in checkpoint_files(paths))


def stock_nearswap_formula(base, secondaries, t):
    """mergekit 0.1.5's nearswap, verbatim, chained (in the checkpoint dtype)."""
    a = base
    for b in secondaries:
        absdiff = torch.abs(a - b)
        weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
        a = weight * b + (1 - weight) * a
    return a


def benchmark_spec(params: float) -> TinyLlama:
    """Layers of Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, 8 KV heads),
    as many as make about `params` parameters: tensors of the size a user merges
    (a 70B's are 8192 x 28672 at most), so per-tensor costs weigh as they do there."""
    hidden, intermediate, heads, kv_heads = 4096, 11008, 32, 8
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate
    layers = max(1, round(params / per_layer))
    return TinyLlama(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        dtype=torch.bfloat16,
    )


def make_checkpoints(work: Path, params: float) -> dict:
    """The benchmark quartet under `work` (generated once, then reused): name -> folder."""
    spec = benchmark_spec(params)
    models = work / f"models-{spec.hidden_size}h-{spec.num_hidden_layers}L"
    if not all((models / name / "model.safetensors").exists() for name in QUARTET):
        click.echo(f"generating four {params / 1e9:.2f}B-parameter checkpoints in {models}")
        build_family(models, QUARTET, spec)
    return {name: str(models / name) for name in QUARTET}


def recipes(paths: dict) -> dict:
    """The benchmark recipes over the quartet: (a) chain, (b) and (c) 3 stages, (d) linear."""
    base, *secondaries = (paths[name] for name in QUARTET)

    def one(method, base_model, models, params=None, dtype="bfloat16", name=None):
        doc = {"merge_method": method, "base_model": base_model, "models": models, "dtype": dtype}
        if params:
            doc["parameters"] = params
        if name:
            doc = {"name": name, **doc}
        return doc

    def staged(method, dtype):
        docs, previous = [], base
        for index, secondary in enumerate(secondaries, 1):
            name = f"stage{index}" if index < len(secondaries) else None
            docs.append(one(method, previous, [{"model": secondary}], {"t": T}, dtype, name))
            previous = name
        return docs

    return {
        "a": [one("nearswap_chain", base, [{"model": s} for s in secondaries], {"t": T})],
        "b": staged("nearswap", "float32"),
        "c": staged("nearswap_chain", "bfloat16"),
        "d": [
            one(
                "linear",
                base,
                [{"model": m, "parameters": {"weight": w}} for m, w in
                 zip([base, *secondaries], [1, 0, 0, 0])],
            )
        ],
    }


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Save a fast tokenizer under a class name transformers 4 and 5 both load (as tiny does)."""
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


# --- memory cgroups ------------------------------------------------------------------------


class SetupError(click.ClickException):
    """The machine cannot run this benchmark as asked (no root, no memory cgroup, no
    disk space): one line naming the fix, exit 2."""

    exit_code = 2


class MemoryCgroup:
    """A child of this process's memory cgroup (v1 or v2) that one merge runs in."""

    counter = 0

    def __init__(self, limit_bytes: Optional[int]):
        self.version, parent = own_memory_cgroup()
        MemoryCgroup.counter += 1
        self.path = parent / f"nearswap-memory-{os.getpid()}-{MemoryCgroup.counter}"
        self.path.mkdir()
        if self.version == 1:
            self.stat_keys = ("total_rss", "total_mapped_file", "total_cache", "total_dirty",
                              "total_writeback")
        else:
            self.stat_keys = ("anon", "file_mapped", "file", "file_dirty", "file_writeback")
        self.set_limit(limit_bytes)

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def set_limit(self, limit_bytes: Optional[int]) -> None:
        if self.version == 1:
            self._write("memory.limit_in_bytes", "-1" if limit_bytes is None else str(limit_bytes))
        else:
            self._write("memory.max", "max" if limit_bytes is None else str(limit_bytes))
            self._write("memory.swap.max", "0")

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> List[int]:
        return [int(line) for line in self.procs_file.read_text().split()]

    def stat(self) -> Dict[str, int]:
        """anon, mapped file, page cache, dirty, writeback: bytes now."""
        values = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            values[key] = int(value)
        return dict(zip(("anon", "mapped", "cache", "dirty", "writeback"),
                        (values.get(key, 0) for key in self.stat_keys)))

    def max_usage(self) -> Optional[int]:
        """High-water mark of all charged memory, page cache included."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        path = self.path / name
        return int(path.read_text()) if path.exists() else None

    def failed_charges(self) -> Optional[int]:
        """v1's memory.failcnt: how often a charge hit the limit (reclaim ran)."""
        path = self.path / "memory.failcnt"
        return int(path.read_text()) if path.exists() else None

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, lift the limit so they can exit, wait."""
        deadline = time.monotonic() + 60
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.set_limit(None)
            time.sleep(0.2)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.2)
        click.echo(f"warning: could not remove {self.path}", err=True)


def own_memory_cgroup() -> Tuple[int, Path]:
    """(cgroup version, directory of this process's memory cgroup)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory")
            if not root.is_dir():
                root = Path("/sys/fs/cgroup")
            return 1, root / path.lstrip("/")
    for line in lines:
        hierarchy, _, path = line.split(":", 2)
        if hierarchy == "0":
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                controllers = root / "cgroup.controllers"
                if controllers.exists() and "memory" in controllers.read_text().split():
                    return 2, root / path.lstrip("/")
    raise SetupError(
        "no cgroup memory controller found for this process (/proc/self/cgroup): "
        "run on Linux with cgroup v1's memory controller or cgroup v2's memory mounted"
    )


def check_cgroups() -> Tuple[int, Path]:
    """Fail with one line unless a child memory cgroup can be made here."""
    if os.geteuid() != 0:
        raise SetupError("memory limits need root: run with sudo")
    version, parent = own_memory_cgroup()
    if version == 2:
        # In v2 a cgroup with processes cannot also have children with controllers.
        if (parent / "cgroup.procs").read_text().split():
            subtree = parent / "cgroup.subtree_control"
            if "memory" not in subtree.read_text().split():
                raise SetupError(
                    f"cgroup v2: {parent} holds processes, so its children get no memory "
                    "controller: run this script inside a cgroup of its own (e.g. "
                    "systemd-run --scope -p Delegate=yes ...)"
                )
    try:
        probe = MemoryCgroup(None)
        probe.remove()
    except OSError as error:
        raise SetupError(f"cannot make a memory cgroup under {parent}: {error}")
    return version, parent


# --- polling memory ------------------------------------------------------------------------


class Poller(threading.Thread):
    """A daemon thread calling `poll` every `interval_s` until stopped or `poll` returns False."""

    def __init__(self, interval_s: float):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.stopping = threading.Event()

    def poll(self) -> Optional[bool]:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.poll() is False:
                break
            self.stopping.wait(self.interval_s)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


class CgroupSampler(Poller):
    """Polls a MemoryCgroup's memory.stat and keeps the peaks, and a coarse timeline."""

    def __init__(self, cgroup: MemoryCgroup, interval_s: float, timeline_s: float = 0.5):
        super().__init__(interval_s)
        self.cgroup, self.timeline_s = cgroup, timeline_s
        self.peaks = {"anon": 0, "anon_mapped": 0, "dirty_writeback": 0}
        self.timeline: List[List[float]] = []
        self.last: Dict[str, int] = {}
        self.next_point = 0.0
        self.start_time = time.monotonic()

    def poll(self) -> Optional[bool]:
        try:
            s = self.cgroup.stat()
        except OSError:
            return False
        self.last = s
        self.peaks["anon"] = max(self.peaks["anon"], s["anon"])
        self.peaks["anon_mapped"] = max(self.peaks["anon_mapped"], s["anon"] + s["mapped"])
        self.peaks["dirty_writeback"] = max(self.peaks["dirty_writeback"], s["dirty"] + s["writeback"])
        now = time.monotonic() - self.start_time
        if now >= self.next_point:
            self.timeline.append([round(now, 2), round(s["anon"] / GIB, 3),
                                  round(s["mapped"] / GIB, 3), round(s["cache"] / GIB, 3)])
            self.next_point = now + self.timeline_s
        return None


class AnonPoller(Poller):
    """Polls RssAnon of a process and its descendants: each one's peak (by name_of) and the sum's."""

    def __init__(self, pid: int, interval_s: float, name_of: Callable[[int], str]):
        super().__init__(interval_s)
        self.pid, self.name_of = pid, name_of
        self.peaks: Dict[str, int] = {}
        self.peak_sum = 0
        self.names: Dict[int, str] = {}

    def poll(self) -> Optional[bool]:
        total = 0
        for pid in descendants(self.pid):
            value = rss_anon(pid)
            if not value:
                continue
            name = self.names.get(pid) or self.names.setdefault(pid, self.name_of(pid))
            self.peaks[name] = max(self.peaks.get(name, 0), value)
            total += value
        self.peak_sum = max(self.peak_sum, total)
        return None


# --- results -------------------------------------------------------------------------------


def folders(*paths) -> List[Path]:
    """The folders, resolved and made (parents too) where missing."""
    resolved = [Path(path).resolve() for path in paths]
    for path in resolved:
        path.mkdir(parents=True, exist_ok=True)
    return resolved


def write_json(path: Path, data, indent: int = 2) -> None:
    """Write `data` to `path` as indented JSON with a final newline."""
    path.write_text(json.dumps(data, indent=indent) + "\n")


def write_markdown(path: Path, text: str) -> None:
    """Write a report's markdown to `path` and echo it."""
    path.write_text(text)
    click.echo(path.read_text())


def write_results(results: Path, name: str, report, text: str) -> None:
    """A benchmark's NAME.json and NAME.md, its partial report (NAME.partial.json) gone."""
    write_json(results / f"{name}.json", report)
    (results / f"{name}.partial.json").unlink(missing_ok=True)
    write_markdown(results / f"{name}.md", text)


def goal_rows(rows: Sequence[Tuple[str, float, float, bool]]) -> List[Dict]:
    """(goal, measured, bound, at_least) rows as goal records, met if measured >= or <= bound."""
    return [
        {"goal": name, "measured": value, "met": value >= bound if at_least else value <= bound}
        for name, value, bound, at_least in rows
    ]


def goal_table(goals: Sequence[Dict], measured_format: str) -> List[str]:
    """The markdown table of goal records, measured values in `measured_format`."""
    lines = ["| goal | measured | met |", "|---|---:|:---:|"]
    for goal in goals:
        lines.append(f"| {goal['goal']} | {goal['measured']:{measured_format}} | "
                     f"{'yes' if goal['met'] else 'no'} |")
    return lines
