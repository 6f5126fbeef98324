"""From a cold disk, under a memory limit smaller than its inputs, the streamed
ladder reads each input from the device about once per pass (at most 1.2x), over
8 batches or more and two passes: nothing it read stays cached for the next pass,
and nothing is read twice within one. Needs root (a memory cgroup of its own);
skips saying so without it."""

import json
import os
import resource
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, only_mergekit_015
from test_ladder_memory import ALLOCATOR
from test_ladder import STORY

from nearswap_mergekit.tiny import QUARTET, TinyLlama, build_family

pytestmark = [
    only_mergekit_015,  # the ladder's own reads: the same with every mergekit
    pytest.mark.skipif(os.geteuid() != 0, reason="a memory cgroup needs root"),
]

#: 32 layers of 1024 x 2816 MLP matrices: 4 x 757 MB of float16 inputs, larger
#: than the limit below, which leaves the ladder's own memory (about 0.8 GB: imports,
#: one layer's inputs, two rows' merged layer) over 1 GB of page cache. Tighter
#: limits thrash: under 1 GiB (14 layers) the ladder did not finish in 10 minutes,
#: and under 1.5 GiB it was once killed for memory with other jobs running.
SPEC = TinyLlama(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=8,
                 num_key_value_heads=4)
LIMIT = 2048 << 20
# (ALLOCATOR: glibc's mmap threshold fixed, as in test_ladder_memory.py. Without it,
# freed blocks of these small tensors stay in glibc's heaps and the ladder was killed
# for memory under this limit when other jobs ran: its anonymous memory followed the
# number of allocations, not what it held.)
CONTEXT = 64


def memory_cgroup() -> Path:
    """A new child of this process's memory cgroup (v1 or v2)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            parent = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            break
    else:
        parent = Path("/sys/fs/cgroup") / next(l for l in lines if l.startswith("0::")).split(":", 2)[2].lstrip("/")
    child = parent / f"nearswap-ladder-cold-{os.getpid()}"
    try:
        child.mkdir()
        limit = child / ("memory.limit_in_bytes" if (child / "memory.limit_in_bytes").exists() else "memory.max")
        limit.write_text(str(LIMIT))
    except OSError as error:
        pytest.skip(f"cannot make a memory cgroup under {parent}: {error}")
    return child


def evict(files) -> None:
    """Drop the files' pages from the page cache: the next read goes to the device."""
    for path in files:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def test_a_cold_ladder_reads_the_inputs_once_per_pass_under_a_memory_limit(tmp_path):
    models = build_family(tmp_path / "models", QUARTET, SPEC)
    base, *secondaries = (str(models[name]) for name in QUARTET)
    (tmp_path / "chain.yml").write_text(yaml.safe_dump({
        "merge_method": "nearswap_chain", "base_model": base,
        "models": [{"model": path} for path in secondaries],
        "parameters": {"t": 1e-4}, "dtype": "float16",
    }, sort_keys=False))
    (tmp_path / "story.txt").write_text(STORY, encoding="utf-8")
    files = [models[name] / "model.safetensors" for name in QUARTET]
    inputs = sum(path.stat().st_size for path in files)
    assert inputs > LIMIT
    os.sync()
    evict(files)
    # Two passes: a budget of half the windows' hidden states (base row and the
    # recipe's rung, float32).
    budget = 2 * 4 * CONTEXT * SPEC.hidden_size * 4
    cgroup = memory_cgroup()
    procs = cgroup / "cgroup.procs"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
    try:
        result = subprocess.run(
            [str(BIN / "nearswap-mergekit"), "ladder", "chain.yml", "--text", "story.txt", "--context",
             str(CONTEXT), "--batch", "1", "--memory-budget", str(budget), "--quiet", "--json", "cold.json"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **ALLOCATOR},
            preexec_fn=lambda: procs.write_text(str(os.getpid())),
        )
        usage = next((cgroup / name).read_text().strip() for name in ("memory.max_usage_in_bytes", "memory.peak")
                     if (cgroup / name).exists())
    finally:
        cgroup.rmdir()
    device_read = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - before) * 512
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "cold.json").read_text())
    assert report["path"] == "layers" and report["passes"] >= 2 and report["batches"] >= 8
    per_pass = device_read / inputs / report["passes"]
    print(f"device read {device_read:,} bytes for {inputs:,} bytes of inputs in {report['passes']} passes: "
          f"{per_pass:.3f}x per pass; the cgroup's peak usage {int(usage):,} bytes")
    # At least most of the inputs each pass (the first pass's reads were not kept
    # for the second), at most 1.2x.
    assert 0.9 <= per_pass <= 1.2, per_pass
