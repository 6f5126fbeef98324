"""How much memory a NearSwap merge needs: the smallest memory limit under which the
stock `mergekit-yaml` completes, per configuration, and a model of it for a preflight check.

    sudo nice -n 5 .venv/bin/python benchmarks/memory.py    # writes benchmarks/results/memory.{json,md}
    .venv/bin/python benchmarks/memory.py --report-only      # refit and rewrite memory.md from memory.json

What it measures. Each configuration is a stock `mergekit-yaml` run in a subprocess
inside a memory cgroup of its own: first without a limit (wall time, peak anonymous
memory), then under limits, bisected on a 0.1 GiB grid, for the smallest limit that
completes. A probe not finished within 3x the unlimited wall time (at least 3 x 60 s:
on a shared machine one unlimited run can be several times faster than the next) has
failed, and every process in its cgroup is killed. A failure is an OOM kill (the
cgroup's OOM counter rose) or a hang (timed out without one; the wait channels of its
threads, the cgroup's failed charges and the last progress line are recorded).
Anonymous memory is what a merge needs; the page cache (the memory-mapped inputs, the
output being written) is reclaimable, though a little of it has to stay resident.
Configurations: the chain (configs/quartet.yml with local paths) with default flags,
with --out-shard-size 1B, with --async-write --write-threads 2 --out-shard-size 1B,
with `tokenizer: source: base` over vocabularies that differ (one secondary has 32,002
rows); mergekit's own `linear` and `nearswap` beside it. Total: about 85 minutes on
2 shared cores (13 of them generating checkpoints), most of it in failing probes,
which run 3x the unlimited time.

Checkpoints have Llama-2-70B tensor shapes (hidden 8192, MLP 28672, 64 heads, 8 KV
heads, vocabulary 32,000; 2 and 4 decoder layers, bf16, safetensors, with the weight
statistics of `nearswap_mergekit.tiny`: secondaries a small delta from the base), plus
one family with Llama-2-7B shapes, so that the largest tensor takes two sizes and the
fit can tell its coefficient from the constant. The tokenizer is a byte-level BPE of
exactly 32,000 tokens built offline. Checkpoints are generated under benchmarks/work/
(about 7, 22 and 32 GB for the three families, one after the other, each deleted when
its cases are done unless --keep-checkpoints; a complete earlier build is reused).

Needs root and the cgroup memory controller, v1 (memory.limit_in_bytes, memory.stat
`total_rss`, memory.oom_control, memory.failcnt) or v2 (memory.max, memory.stat `anon`,
memory.events; untested here). Probe cgroups are made as children of this process's
own memory cgroup. Peak anonymous memory is polled from memory.stat every 10 ms:
neither version keeps a high-water mark of anonymous memory alone (v1's
max_usage_in_bytes and v2's memory.peak include the page cache). Before every run the
input checkpoints are evicted from the page cache (posix_fadvise DONTNEED), so the
merge reads them from disk and they are charged to its cgroup, as a 70B merge's
inputs, which never fit in the page cache, would be. Shared libraries already in the
page cache stay charged to the cgroup that first read them (both cgroup versions charge
on first use), so the limits found here exclude the code pages of Python, torch and
mergekit that a cold start would read.

`predicted_need_bytes` is the fitted model, pure Python, to copy into a preflight check.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import click
import torch
import yaml
from harness import (BIN, GIB, HERE, T, CgroupSampler, MemoryCgroup, SetupError, check_cgroups,
                     cpu_model, evict, folders, in_cgroup, offline_env, save_tokenizer, write_json,
                     write_markdown)

from nearswap_mergekit.tiny import QUARTET, TinyLlama, _llama_config, llama_tensor_shapes

#: Rows the one differing vocabulary has beyond the others' 32,000.
EXTRA_VOCAB_ROWS = 2
VOCAB = 32000
#: mergekit's default --out-shard-size (mergekit.options: parse_kmb("5B"), in bytes).
DEFAULT_OUT_SHARD_BYTES = 5 * 10**9

# --- the model a preflight check can use --------------------------------------------------

#: Fitted by this script (benchmarks/results/memory.md): the constant in bytes, the
#: others multiply bytes.
NEED_CONSTANT_BYTES = 460_556_205  # 0.43 GiB
NEED_LARGEST_TENSOR_FACTOR = 0.90
NEED_ASYNC_SHARDS_PER_WRITE_THREAD = 0.071
NEED_VOCAB_FACTOR = 0.89


def predicted_need_bytes(
    largest_tensor_bytes: int,
    out_shard_bytes: int,
    async_write: bool,
    write_threads: int,
    vocab_aligned_embedding_bytes: int,
) -> int:
    """Memory limit under which a `nearswap_chain` merge by `mergekit-yaml` (CPU) completes.

    need = C + S x (1 + a x write_threads if async_write) + k x T + v x V

    largest_tensor_bytes (T): the largest output tensor in the merge dtype (a 70B
        Llama's embedding: 32000 x 8192 x 2 bytes).
    out_shard_bytes (S): output bytes held before a shard is written: the smaller of
        --out-shard-size (bytes; mergekit's default 5e9) and the whole output.
    async_write, write_threads: mergekit-yaml's --async-write and --write-threads
        (fitted with 2 write threads only).
    vocab_aligned_embedding_bytes (V): with a `tokenizer:` block, the aligned copies
        mergekit makes of one vocabulary tensor: number of models x output vocabulary
        rows x hidden size x bytes per element; 0 without one.
    """
    shards = 1.0 + (NEED_ASYNC_SHARDS_PER_WRITE_THREAD * write_threads if async_write else 0.0)
    return int(
        NEED_CONSTANT_BYTES
        + shards * out_shard_bytes
        + NEED_LARGEST_TENSOR_FACTOR * largest_tensor_bytes
        + NEED_VOCAB_FACTOR * vocab_aligned_embedding_bytes
    )


# --- checkpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A checkpoint family: Llama tensor shapes and a number of decoder layers."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int

    def spec(self) -> TinyLlama:
        return TinyLlama(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            dtype=torch.bfloat16,
        )

    @property
    def label(self) -> str:
        return f"{self.name}, {self.layers} layers"


LLAMA2_70B = Shape("Llama-2-70B", 8192, 28672, 64, 8, 2)
LLAMA2_7B = Shape("Llama-2-7B", 4096, 11008, 32, 32, 2)
#: The secondary whose vocabulary has EXTRA_VOCAB_ROWS more tokens.
WIDER_VOCAB = "xwin-32002"
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def build_vocab_tokenizer(out_dir: Path, vocab_size: int, extra_tokens: int = 0) -> int:
    """Save a byte-level BPE tokenizer of exactly `vocab_size` tokens (plus `extra_tokens`
    added ones); return its length.

    `tiny.build_tokenizer` trains on a short text, which cannot reach a 32,000-token
    vocabulary; this one is built directly: two special tokens, the 256 byte symbols,
    then pairs of them, each with its merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1}
    vocab.update({symbol: index + 2 for index, symbol in enumerate(alphabet)})
    merges = []
    for first in alphabet:
        for second in alphabet:
            if len(vocab) >= vocab_size:
                break
            vocab[first + second] = len(vocab)
            merges.append((first, second))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    wrapped.add_tokens([f"<extra_{index}>" for index in range(extra_tokens)])
    save_tokenizer(wrapped, out_dir)
    return len(wrapped)


class StreamingSafetensors:
    """A safetensors file written one tensor at a time, in the order of `shapes`, so a
    checkpoint larger than the memory to spare can be generated."""

    def __init__(self, path: Path, shapes: Dict[str, tuple], dtype: torch.dtype):
        self.path, self.shapes, self.dtype = path, shapes, dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shapes.items():
            size = math.prod(shape) * itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(len(text).to_bytes(8, "little") + text)
        self.pending = list(shapes)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        assert name == self.pending.pop(0) and tuple(tensor.shape) == self.shapes[name], name
        self.file.write(memoryview(tensor.to(self.dtype).contiguous().view(torch.uint8).numpy()))

    def close(self) -> None:
        assert not self.pending, f"{self.path}: {self.pending} not written"
        self.file.flush()
        os.fsync(self.file.fileno())  # clean pages, so they can be evicted before each run
        self.file.close()


def family_dir(work: Path, shape: Shape) -> Path:
    return work / f"{shape.name}-{shape.layers}L"


def family_names(shape: Shape, with_wider_vocab: bool) -> List[str]:
    return [*QUARTET, WIDER_VOCAB] if with_wider_vocab else list(QUARTET)


def checkpoint_bytes(shape: Shape, vocab: int = VOCAB) -> int:
    config = _llama_config(shape.spec(), vocab)
    return sum(math.prod(s) for s in llama_tensor_shapes(config).values()) * 2


def largest_tensor_bytes(shape: Shape, vocab: int = VOCAB) -> int:
    config = _llama_config(shape.spec(), vocab)
    return max(math.prod(s) for s in llama_tensor_shapes(config).values()) * 2


class Weights:
    """Weights with `tiny`'s statistics (base std `weight_std`, norms around 1, each
    secondary the base plus a Gaussian delta of std `delta_std`, `identical_fraction`
    of it unchanged), cut from one pool of Gaussian noise at offsets keyed by tensor and
    model.

    tiny.base_tensor and tiny.secondary_tensor draw every element afresh: billions of
    draws per 70B-shaped family, most of the time to build one on 2 cores; copying
    from a pool is cheaper. Memory use and the merge's arithmetic do not depend on the
    values.
    """

    POOL = 1 << 25
    #: P(N(0, 1) > 2.3263) = 0.01, tiny's default identical_fraction.
    KEEP_QUANTILE = {0.01: 2.3263}

    def __init__(self, spec: TinyLlama):
        self.spec = spec
        self.pool = torch.randn(self.POOL + 1, generator=torch.Generator().manual_seed(0))

    def noise(self, shape: tuple, *key: object) -> torch.Tensor:
        """Standard normal values, a window of the pool (wrapping) starting at a keyed offset."""
        count = math.prod(shape)
        out = torch.empty(count)
        offset = zlib.crc32(repr(key).encode()) % self.POOL
        done = 0
        while done < count:
            take = min(self.POOL - offset, count - done)
            out[done:done + take] = self.pool[offset:offset + take]
            done, offset = done + take, 0
        return out.view(shape)

    def base(self, name: str, shape: tuple) -> torch.Tensor:
        values = self.noise(shape, "base", name).mul_(self.spec.weight_std)
        if name.endswith("norm.weight"):
            values += 1.0
        return values.to(self.spec.dtype)

    def secondary(self, base: torch.Tensor, name: str, model: str) -> torch.Tensor:
        delta = self.noise(base.shape, "delta", model, name).mul_(self.spec.delta_std)
        result = delta.add_(base.float()).to(self.spec.dtype)
        del delta
        keep = self.noise(base.shape, "keep", model, name) > self.KEEP_QUANTILE[self.spec.identical_fraction]
        return torch.where(keep, base, result)


def build_family(work: Path, shape: Shape, with_wider_vocab: bool) -> Path:
    """Write the quartet (and the wider-vocabulary secondary) with `shape`; reuse a
    complete earlier build."""
    out = family_dir(work, shape)
    names = family_names(shape, with_wider_vocab)
    marker = out / "complete.json"
    if marker.exists() and set(names) <= set(json.loads(marker.read_text())["names"]):
        return out
    shutil.rmtree(out, ignore_errors=True)
    need = sum(checkpoint_bytes(shape) for _ in names)
    free = shutil.disk_usage(work).free
    if free < need + 10e9:
        raise SetupError(
            f"building {shape.label} needs {need / 1e9:.0f} GB and leaves less than 10 GB "
            f"free ({free / 1e9:.0f} GB free in {work}): free space or pass a --work elsewhere"
        )
    click.echo(f"building {len(names)} {shape.label} checkpoints ({need / 1e9:.1f} GB) in {out}")
    start = time.perf_counter()
    spec = shape.spec()
    weights = Weights(spec)
    writers = {}
    for name in names:
        (out / name).mkdir(parents=True)
        vocab = build_vocab_tokenizer(out / name, VOCAB, EXTRA_VOCAB_ROWS if name == WIDER_VOCAB else 0)
        config = _llama_config(spec, vocab)
        (out / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        writers[name] = StreamingSafetensors(out / name / "model.safetensors",
                                             llama_tensor_shapes(config), spec.dtype)
    shapes = llama_tensor_shapes(_llama_config(spec, VOCAB))
    for tensor_name, tensor_shape in shapes.items():
        base = weights.base(tensor_name, tensor_shape)
        writers[QUARTET[0]].write(tensor_name, base)
        for model in QUARTET[1:]:
            secondary = weights.secondary(base, tensor_name, model)
            writers[model].write(tensor_name, secondary)
            if model == QUARTET[-1] and WIDER_VOCAB in writers:
                if tensor_shape[0] == VOCAB and len(tensor_shape) == 2:  # embeddings, lm_head
                    extra = weights.base(f"{tensor_name}#extra", (EXTRA_VOCAB_ROWS, tensor_shape[1]))
                    secondary = torch.cat([secondary, extra])
                writers[WIDER_VOCAB].write(tensor_name, secondary)
            del secondary
        del base
    for writer in writers.values():
        writer.close()
    marker.write_text(json.dumps({"names": names, "seconds": round(time.perf_counter() - start, 1),
                                  "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    return out


# --- one run -------------------------------------------------------------------------------


def thread_states(pids: Sequence[int]) -> Dict[str, int]:
    """How many threads of `pids` are in each state and kernel wait channel ("D
    folio_wait_bit_common": waiting on a page in reclaim): where a hang sits."""
    states: Dict[str, int] = {}
    for pid in pids:
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = (task / "wchan").read_text().strip()
                key = f"{state} {wchan}" if wchan not in ("", "0") else state
                states[key] = states.get(key, 0) + 1
        except OSError:
            continue
    return states


def process_cpu_s(pids: Sequence[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except OSError:
            continue
    return total


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def last_progress(stderr_path: Path) -> str:
    """The last progress line mergekit wrote (tqdm rewrites lines with CR)."""
    text = stderr_path.read_text(errors="replace") if stderr_path.exists() else ""
    pieces = [p.strip() for p in text.replace("\r", "\n").splitlines() if p.strip()]
    return pieces[-1][-160:] if pieces else ""


def run_in_cgroup(command: Sequence[str], cwd: Path, limit_bytes: Optional[int],
                  timeout_s: Optional[float], inputs: Sequence[Path], out_dir: Path,
                  poll_s: float) -> Dict:
    """Run `command` in a fresh memory cgroup with `limit_bytes`; what happened, and the
    memory it used."""
    shutil.rmtree(out_dir, ignore_errors=True)
    evict(inputs)
    cgroup = MemoryCgroup(limit_bytes)
    stderr_path = out_dir.parent / f"{out_dir.name}.stderr"
    wrapped = in_cgroup(command, cgroup)
    sampler = CgroupSampler(cgroup, poll_s)
    result: Dict = {"limit_gib": None if limit_bytes is None else round(limit_bytes / GIB, 3)}
    try:
        with open(stderr_path, "wb") as stderr:
            start = time.perf_counter()
            sampler.start()
            process = subprocess.Popen(wrapped, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr,
                                       env=offline_env())
            try:
                code = process.wait(timeout=timeout_s)
                outcome = "ok" if code == 0 else None
            except subprocess.TimeoutExpired:
                pids = cgroup.pids()
                result["at_timeout"] = {
                    "threads": thread_states(pids),
                    "cpu_s": round(process_cpu_s(pids), 1),
                    "output_gb_written": round(folder_bytes(out_dir) / 1e9, 3),
                    "anon_gib": round(sampler.last.get("anon", 0) / GIB, 3),
                    "failed_charges": cgroup.failed_charges(),
                    "progress": last_progress(stderr_path),
                }
                cgroup.kill_all()
                code = process.wait()
                outcome = "hang"
            wall = time.perf_counter() - start
        sampler.stop()
        oom_kills = cgroup.oom_kills()
        if outcome is None:
            outcome = "oom-kill" if oom_kills else f"exit {code}"
            if not oom_kills:
                result["stderr"] = last_progress(stderr_path)
        result.update({
            "outcome": outcome,
            "wall_s": round(wall, 2),
            "peak_anon_gib": round(sampler.peaks["anon"] / GIB, 3),
            "peak_anon_plus_mapped_gib": round(sampler.peaks["anon_mapped"] / GIB, 3),
            "peak_dirty_writeback_gib": round(sampler.peaks["dirty_writeback"] / GIB, 3),
            "max_usage_gib": None if cgroup.max_usage() is None else round(cgroup.max_usage() / GIB, 3),
            "oom_kills": oom_kills,
        })
        if limit_bytes is None:
            result["timeline"] = sampler.timeline
    finally:
        sampler.stopping.set()
        cgroup.remove()
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


# --- configurations ------------------------------------------------------------------------

#: mergekit-yaml's write options, as `nearswap-mergekit` recommends them for a chain.
SHARD_1B = ["--out-shard-size", "1B"]
#: The least unlimited wall time the probe timeout is a multiple of.
TIMEOUT_BASE_FLOOR_S = 60.0
ASYNC_1B = ["--async-write", "--write-threads", "2", *SHARD_1B]


@dataclass(frozen=True)
class Case:
    """One merge to measure: a recipe on a checkpoint family, with mergekit-yaml flags."""

    key: str
    label: str
    method: str
    flags: Tuple[str, ...] = ()
    tokenizer: bool = False

    def models(self) -> Tuple[str, List[str]]:
        """The base and the other models, by folder name."""
        base, *others = QUARTET
        if self.method == "nearswap":
            return base, others[:1]
        if self.tokenizer:
            return base, [*others[:-1], WIDER_VOCAB]
        return base, others

    def recipe(self) -> Dict:
        base, others = self.models()
        doc: Dict = {"merge_method": self.method, "base_model": f"./{base}"}
        if self.method == "linear":
            doc["models"] = [{"model": f"./{m}", "parameters": {"weight": w}}
                             for m, w in zip([base, *others], [1, 0, 0, 0])]
        else:
            doc["models"] = [{"model": f"./{m}"} for m in others]
            doc["parameters"] = {"t": T}
        # The checkpoints' own dtype, as configs/quartet.yml's float16 is its inputs'.
        doc["dtype"] = "bfloat16"
        if self.tokenizer:
            doc["tokenizer"] = {"source": "base"}
        return doc

    def out_shard_bytes(self) -> int:
        flags = list(self.flags)
        if "--out-shard-size" in flags:
            value = flags[flags.index("--out-shard-size") + 1]
            return int(float(value.rstrip("BMK")) * {"B": 1e9, "M": 1e6, "K": 1e3}[value[-1]])
        return DEFAULT_OUT_SHARD_BYTES

    @property
    def async_write(self) -> bool:
        return "--async-write" in self.flags

    @property
    def write_threads(self) -> int:
        flags = list(self.flags)
        return int(flags[flags.index("--write-threads") + 1]) if "--write-threads" in flags else 1


CASES = {case.key: case for case in (
    Case("chain-1b", "nearswap_chain, --out-shard-size 1B", "nearswap_chain", tuple(SHARD_1B)),
    Case("chain", "nearswap_chain, default flags (5B shards)", "nearswap_chain"),
    Case("chain-async", "nearswap_chain, --async-write --write-threads 2 --out-shard-size 1B",
         "nearswap_chain", tuple(ASYNC_1B)),
    Case("chain-tokenizer", f"nearswap_chain, tokenizer: source: base, one secondary with "
         f"{VOCAB + EXTRA_VOCAB_ROWS} rows, --out-shard-size 1B", "nearswap_chain",
         tuple(SHARD_1B), tokenizer=True),
    Case("linear", "stock linear (weights 1, 0, 0, 0), --out-shard-size 1B", "linear", tuple(SHARD_1B)),
    Case("nearswap", "stock nearswap, one stage (base + 1), --out-shard-size 1B", "nearswap",
         tuple(SHARD_1B)),
)}
#: What is measured, in order: a family, the cases searched on it, and the cases only
#: run without a limit (to see whether their peak grows with the model).
PLAN: List[Tuple[Shape, List[str], List[str]]] = [
    (LLAMA2_7B, ["chain-1b"], []),
    (LLAMA2_70B, ["chain-1b", "chain", "chain-async", "chain-tokenizer", "linear", "nearswap"], []),
    (replace(LLAMA2_70B, layers=4), ["chain-1b", "chain"], ["chain-async"]),
]


def case_terms(case: Case, shape: Shape) -> Dict[str, float]:
    """The quantities the memory model is a function of, for `case` on `shape`."""
    base, others = case.models()
    output = checkpoint_bytes(shape)
    terms = {
        "largest_tensor_bytes": largest_tensor_bytes(shape),
        "output_bytes": output,
        "out_shard_bytes": min(case.out_shard_bytes(), output),
        "async_write": case.async_write,
        "write_threads": case.write_threads,
        "vocab_aligned_embedding_bytes": 0,
    }
    if case.tokenizer:
        # mergekit aligns every model's copy of a vocabulary tensor to the output
        # vocabulary (the base's 32,000 tokens here), in the merge dtype.
        terms["vocab_aligned_embedding_bytes"] = (1 + len(others)) * VOCAB * shape.hidden * 2
    return terms


# --- the search ----------------------------------------------------------------------------


@dataclass
class Search:
    """Bisection on a grid of `step` bytes between a failing and a completing limit."""

    run: Callable[[int], Dict]
    step: int
    probes: List[Dict] = field(default_factory=list)

    def probe(self, grid: int) -> bool:
        result = self.run(grid * self.step)
        self.probes.append(result)
        click.echo(f"    limit {grid * self.step / GIB:.2f} GiB: {result['outcome']} "
                   f"({result['wall_s']:.0f} s, peak anon {result['peak_anon_gib']:.2f} GiB)")
        return result["outcome"] == "ok"

    def smallest(self, guess: int, ceiling: int) -> Tuple[Optional[int], Optional[int]]:
        """(largest failing, smallest completing) grid points, starting at `guess`."""
        ok_at, fail_at = None, None
        if self.probe(guess):
            ok_at = guess
        else:
            fail_at = guess
        widen = 1
        while ok_at is None:
            point = min(fail_at + widen, ceiling)
            if self.probe(point):
                ok_at = point
            elif point >= ceiling:
                return fail_at, None
            else:
                fail_at, widen = point, widen * 2
        widen = 1
        while fail_at is None:
            point = ok_at - widen
            if point <= 0:
                return None, ok_at
            if self.probe(point):
                ok_at, widen = point, widen * 2
            else:
                fail_at = point
        while ok_at - fail_at > 1:
            middle = (ok_at + fail_at) // 2
            if self.probe(middle):
                ok_at = middle
            else:
                fail_at = middle
        return fail_at, ok_at


def anon_after_merge(timeline: List[List[float]]) -> float:
    """The run's floor of anonymous memory (GiB) once its output is written (start-up
    and planning): the least in its last 3 s, the final 0.5 s of exiting excluded."""
    end = timeline[-1][0]
    window = [point[1] for point in timeline if end - 3 <= point[0] <= end - 0.5]
    return min(window) if window else float("nan")


def measure_case(case: Case, shape: Shape, family: Path, work: Path, step: int,
                 timeout_factor: float, poll_s: float, margin_guess: float, search: bool) -> Dict:
    """Unlimited run, then (if `search`) the search for the smallest completing limit."""
    base, others = case.models()
    names = [base, *others]
    inputs = [family / name / "model.safetensors" for name in names]
    recipe_path = work / f"recipe-{case.key}.yml"
    recipe_path.write_text(yaml.safe_dump(case.recipe(), sort_keys=False))
    out_dir = work / f"out-{case.key}"
    command = [str(BIN / "mergekit-yaml"), str(recipe_path), str(out_dir), *case.flags]

    click.echo(f"  {case.key} on {shape.label}: unlimited")
    unlimited = run_in_cgroup(command, family, None, None, inputs, out_dir, poll_s)
    if unlimited["outcome"] != "ok":
        raise click.ClickException(f"{case.key} failed without a limit ({unlimited['outcome']}): "
                                   f"{unlimited.get('stderr', '')}")
    unlimited["anon_after_merge_gib"] = round(anon_after_merge(unlimited["timeline"]), 3)
    click.echo(f"    {unlimited['wall_s']:.0f} s, peak anon {unlimited['peak_anon_gib']:.2f} GiB")
    # On a shared machine one unlimited run can be several times faster than the next
    # (16 s and 63 s for the same merge); a floor keeps that luck from being read as a hang.
    timeout = timeout_factor * max(unlimited["wall_s"], TIMEOUT_BASE_FLOOR_S)
    bisection = Search(lambda limit: run_in_cgroup(command, family, limit, timeout, inputs, out_dir, poll_s),
                       step)
    failing = completing = below = None
    if search:
        guess = math.ceil((unlimited["peak_anon_gib"] + margin_guess) * GIB / step)
        ceiling = math.ceil(unlimited["max_usage_gib"] * GIB / step) if unlimited["max_usage_gib"] else 10**6
        failing, completing = bisection.smallest(guess, max(ceiling, guess + 1))
        below = next((p for p in bisection.probes if failing is not None
                      and p["limit_gib"] == round(failing * step / GIB, 3)), None)
    return {
        "key": case.key,
        "label": case.label,
        "shape": shape.name,
        "layers": shape.layers,
        "recipe": case.recipe(),
        "flags": list(case.flags),
        "input_gb": round(sum(p.stat().st_size for p in inputs) / 1e9, 3),
        "terms": case_terms(case, shape),
        "unlimited": unlimited,
        "timeout_s": round(timeout, 1),
        "searched": search,
        "probes": bisection.probes,
        "smallest_completing_gib": None if completing is None else round(completing * step / GIB, 3),
        "largest_failing_gib": None if failing is None else round(failing * step / GIB, 3),
        "failure_below": None if below is None else below["outcome"],
    }


# --- the model -----------------------------------------------------------------------------

#: The model's terms, in the order of its coefficients.
MODEL_TERMS = ("constant", "largest tensor", "async: extra output shards", "aligned vocabulary copies")


def model_row(terms: Dict) -> List[float]:
    """The row of the design matrix; need = constant + out shard + coefficients . row."""
    async_shards = terms["out_shard_bytes"] * terms["write_threads"] if terms["async_write"] else 0
    return [1.0, terms["largest_tensor_bytes"], async_shards, terms["vocab_aligned_embedding_bytes"]]


def fit_model(rows: List[Dict]) -> Dict:
    """Least-squares coefficients of the model over the nearswap_chain cases, then the
    constant raised until no case needs more than predicted (a preflight check must not
    pass a merge that then hangs).

    No coefficient may be negative (more output held, or more copies, never needs less
    memory): a term that would fit with one is dropped. The constant may not be below
    the start-up floor measured in the same runs: the largest tensor takes only two
    sizes here, and an unconstrained fit trades the constant for its factor, which
    would under-predict merges of small models. A term no case exercises stays 0.
    """
    import numpy as np

    cases = [r for r in rows if r["recipe"]["merge_method"] == "nearswap_chain"
             and r["smallest_completing_gib"] is not None]
    floor = min(r["unlimited"]["anon_after_merge_gib"] for r in cases)
    # In GiB, so the columns are of one scale; the constant's column is 1 GiB.
    design = np.array([[1.0, *(x / GIB for x in model_row(r["terms"])[1:])] for r in cases])
    target = np.array([(r["smallest_completing_gib"] * GIB - r["terms"]["out_shard_bytes"]) / GIB
                       for r in cases])
    used = [j for j in range(design.shape[1]) if np.any(design[:, j])]
    constant: Optional[float] = None  # free until the fit puts it below the floor
    while True:
        if constant is None:
            solution, *_ = np.linalg.lstsq(design[:, used], target, rcond=None)
            coefficients = np.zeros(design.shape[1])
            coefficients[used] = solution
        else:
            others = [j for j in used if j]
            solution, *_ = np.linalg.lstsq(design[:, others], target - constant, rcond=None)
            coefficients = np.zeros(design.shape[1])
            coefficients[others] = solution
            coefficients[0] = constant
        negative = [j for j in used if j and coefficients[j] < 0]
        if negative:
            used.remove(negative[0])
        elif constant is None and coefficients[0] < floor:
            constant = floor
        else:
            break
    residual = target - design @ coefficients
    coefficients[0] += max(float(residual.max()), 0.0)
    return {
        "coefficients": {name: float(value * GIB if j == 0 else value)
                         for j, (name, value) in enumerate(zip(MODEL_TERMS, coefficients))},
        "start_up_floor_gib": floor,
        "constant_held_at_floor": constant is not None,
        "fitted_on": [f"{r['key']} ({r['shape']}, {r['layers']} layers)" for r in cases],
    }


def predict(model: Dict, terms: Dict) -> float:
    c = list(model["coefficients"].values())
    return terms["out_shard_bytes"] + sum(a * b for a, b in zip(c, model_row(terms)))


# --- results -------------------------------------------------------------------------------


def progress_elapsed_s(progress: str) -> Optional[float]:
    """Seconds into the graph at the progress bar's last update ("[04:17<00:24")."""
    import re

    found = re.search(r"\[(?:(\d+):)?(\d+):(\d+)<", progress)
    if not found:
        return None
    hours, minutes, seconds = (int(x) if x else 0 for x in found.groups())
    return 3600 * hours + 60 * minutes + seconds


def hang_kind(probe: Dict) -> str:
    """'stalled' when the progress bar stopped long before the kill, else 'crawling'."""
    at = probe.get("at_timeout", {})
    elapsed = progress_elapsed_s(at.get("progress", ""))
    if elapsed is None:
        return "stalled"
    return "crawling" if elapsed > 0.5 * probe["wall_s"] else "stalled"


def failure_text(row: Dict) -> str:
    if not row["searched"]:
        return "not searched"
    below = next((p for p in row["probes"] if p["limit_gib"] == row["largest_failing_gib"]), None)
    if below is None:
        return "none found"
    if below["outcome"] == "hang":
        at = below.get("at_timeout", {})
        waiting = sorted((n, k) for k, n in at.get("threads", {}).items() if k.startswith("D "))
        where = f", {waiting[-1][0]} thread(s) in D {waiting[-1][1][2:]}" if waiting else ""
        kind = hang_kind(below)
        if kind == "stalled":
            kind += f" after {progress_elapsed_s(at.get('progress', '')) or 0:.0f} s of merging"
        return (f"hang at {row['largest_failing_gib']:.1f} ({kind}; killed at {below['wall_s']:.0f} s, "
                f"anon {at.get('anon_gib', 0):.2f} GiB{where})")
    return f"{below['outcome']} at {row['largest_failing_gib']:.1f} after {below['wall_s']:.0f} s"


def markdown(report: Dict) -> str:
    m = report["machine"]
    rows = report["cases"]
    lines = [
        f"Measured {report['date']} by `benchmarks/memory.py` on {m['cpu']}, {m['cores']} cores, "
        f"{m['ram_gib']:.0f} GiB RAM, {m['swap_gib']:.0f} GiB swap, Linux {m['kernel']}, cgroup "
        f"{m['cgroup']}, torch {m['torch']}; " + run_text(report),
        "",
        "The stock `mergekit-yaml` (mergekit 0.1.5, CPU) in a memory cgroup of its own, inputs "
        "read from disk (evicted from the page cache before each run). Checkpoints: Llama-2-70B "
        "tensor shapes (hidden 8192, MLP 28672, 64/8 heads, vocabulary 32,000), bf16, 2 or 4 decoder "
        "layers (4.47 or 7.89 GB each); one row with Llama-2-7B shapes (hidden 4096, MLP 11008, 1.33 GB). "
        f"Recipes as configs/quartet.yml (t = {T}) with local paths (`./miqu`, ...) and "
        "`dtype: bfloat16`, the checkpoints' own (the quartet's float16 is its inputs' own; a "
        "cast would add a copy of every input tensor), its `tokenizer:` block only in the "
        "tokenizer row. *Peak anonymous* is polled from memory.stat "
        f"(`{'total_rss' if m['cgroup'] == 'v1' else 'anon'}`) every {report['settings']['poll_ms']:.0f} ms. "
        f"*Smallest completing limit*: bisection on a {report['settings']['resolution_gib']} GiB grid; "
        f"a probe not done in {report['settings']['timeout_factor']:.0f}x the unlimited wall time "
        f"(at least {report['settings']['timeout_factor'] * report['settings'].get('timeout_floor_s', TIMEOUT_BASE_FLOOR_S):.0f} s) "
        "counts as a hang and is killed. The machine is shared (2 cores, other jobs running): "
        "wall times are noisy, one run each; a probe near the need can go either way from one "
        "run to the next.",
        "",
        "| configuration | shapes | layers | input GB | unlimited wall s | peak anonymous GiB (unlimited) "
        "| smallest completing limit GiB | failure just below |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        smallest = (f"{r['smallest_completing_gib']:.1f}" if r["smallest_completing_gib"] is not None
                    else "not found" if r["searched"] else "not searched")
        lines.append(
            f"| {r['label']} | {r['shape']} | {r['layers']} | {r['input_gb']:.1f} | "
            f"{r['unlimited']['wall_s']:.0f} | {r['unlimited']['peak_anon_gib']:.2f} | {smallest} | "
            f"{failure_text(r)} |"
        )
    lines += ["", *layer_lines(rows), *mechanism_lines(report)]
    model = report["model"]
    c = model["coefficients"]
    lines += [
        "",
        "**Memory model** (for a preflight check; `predicted_need_bytes` in benchmarks/memory.py):",
        "",
        "```",
        "need = C + S x (1 + a x write_threads if --async-write) + k x T + v x V",
        f"C = {c['constant'] / GIB:.2f} GiB   start-up and planning (Python, torch, mergekit), plus the page cache a merge cannot do without",
        "S = output bytes held before a shard is written: min(--out-shard-size in bytes, default 5e9; the whole output)",
        f"k = {c['largest tensor']:.2f}        T = the largest tensor's bytes (70B: the 32000 x 8192 embedding, 0.52 GB in bf16)",
        f"a = {c['async: extra output shards']:.2f}",
        f"v = {c['aligned vocabulary copies']:.2f}        V = with a `tokenizer:` block: models x output vocabulary x hidden x bytes per element; else 0",
        "```",
        "",
        "Fitted by least squares on the nearswap_chain rows, no coefficient negative"
        + (f" and C not below the start-up floor measured in the same runs "
           f"({model['start_up_floor_gib']:.2f} GiB; the largest tensor takes only two sizes here, "
           "and without that bound the fit trades C for k, which would under-predict merges of "
           "small models)" if model.get("constant_held_at_floor") else "")
        + ", then C raised until no row needs more than predicted. k is the output held "
        "beyond S when a shard is written (the tensor that does not fit, at most T), so it "
        "depends on how tensors pack into shards; a is what --async-write adds per write "
        "thread, v the aligned vocabulary copies. Error against each measurement (the grid is "
        f"{report['settings']['resolution_gib']} GiB, so a measured limit is the need rounded up to it):",
        "",
        "| configuration | shapes | layers | S GB | T GB | V GB | predicted GiB | smallest completing GiB | error GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["smallest_completing_gib"] is None or r["recipe"]["merge_method"] != "nearswap_chain":
            continue
        t = r["terms"]
        predicted = predict(model, t) / GIB
        lines.append(
            f"| {r['label']} | {r['shape']} | {r['layers']} | {t['out_shard_bytes'] / 1e9:.2f} | "
            f"{t['largest_tensor_bytes'] / 1e9:.2f} | {t['vocab_aligned_embedding_bytes'] / 1e9:.2f} | "
            f"{predicted:.2f} | {r['smallest_completing_gib']:.1f} | {predicted - r['smallest_completing_gib']:+.2f} |"
        )
    in_code = [NEED_CONSTANT_BYTES, NEED_LARGEST_TENSOR_FACTOR, NEED_ASYNC_SHARDS_PER_WRITE_THREAD,
               NEED_VOCAB_FACTOR]
    fitted = list(c.values())
    same = abs(in_code[0] - fitted[0]) < 0.01 * GIB and all(
        abs(a - b) < 0.01 for a, b in zip(in_code[1:], fitted[1:]))
    for r in rows:
        sync = next((x for x in rows if x["key"] == "chain-1b" and x["shape"] == r["shape"]
                     and x["layers"] == r["layers"]), None)
        if not (CASES[r["key"]].async_write and r["smallest_completing_gib"] and sync
                and sync["smallest_completing_gib"] == r["smallest_completing_gib"]):
            continue
        t = r["terms"]
        added = c["async: extra output shards"] * t["out_shard_bytes"] * t["write_threads"] / GIB
        lines += ["", f"With --async-write ({r['layers']} layers) the measured need is the synchronous "
                  f"one ({r['smallest_completing_gib']:.1f} GiB); the {added:.2f} GiB that a adds is "
                  "what covers that row with k as fitted, a margin more than a cost."]
    lines += ["", "`predicted_need_bytes` in benchmarks/memory.py holds these values." if same else
              "`predicted_need_bytes` in benchmarks/memory.py holds other values: copy these there."]
    lines += ["", *other_method_lines(report)]
    return "\n".join(lines) + "\n"


def run_text(report: Dict) -> str:
    if "total_s" not in report:
        return "a partial run (interrupted)."
    built = sum(b["seconds"] for b in report["builds"] if not b["reused"])
    reused = [b["family"] for b in report["builds"] if b["reused"]]
    text = f"one run of everything, {report['total_s'] / 60:.0f} min"
    text += f" ({built / 60:.0f} min of it generating checkpoints" if built else " ("
    text += (f"{'; ' if built else ''}checkpoints of {', '.join(reused)} reused from an earlier "
             "build)." if reused else ").")
    return text


def layer_lines(rows: List[Dict]) -> List[str]:
    """2 layers against 4, per case searched at both."""
    found = {(r["key"], r["layers"]): r for r in rows if r["shape"] == LLAMA2_70B.name}
    lines = ["**2 layers against 4** (Llama-2-70B shapes):", ""]
    for key in CASES:
        two, four = found.get((key, 2)), found.get((key, 4))
        if not (two and four):
            continue
        text = (f"- {CASES[key].label}: peak anonymous {two['unlimited']['peak_anon_gib']:.2f} -> "
                f"{four['unlimited']['peak_anon_gib']:.2f} GiB")
        if two["smallest_completing_gib"] and four["smallest_completing_gib"]:
            text += (f", smallest completing limit {two['smallest_completing_gib']:.1f} -> "
                     f"{four['smallest_completing_gib']:.1f} GiB")
        held = (two["terms"]["out_shard_bytes"], four["terms"]["out_shard_bytes"])
        text += f" (output held before a write, S: {held[0] / 1e9:.2f} -> {held[1] / 1e9:.2f} GB)."
        lines.append(text)
    return lines + [""]


def mechanism_lines(report: Dict) -> List[str]:
    """What the runs show about where the memory goes and how a merge fails."""
    rows = report["cases"]
    floors = [r["unlimited"]["anon_after_merge_gib"] for r in rows
              if not math.isnan(r["unlimited"].get("anon_after_merge_gib", float("nan")))]
    margins = [r["smallest_completing_gib"] - r["unlimited"]["peak_anon_gib"] for r in rows
               if r["smallest_completing_gib"] is not None and not CASES[r["key"]].async_write]
    hangs = [p for r in rows for p in r["probes"] if p["outcome"] == "hang"]
    ooms = [p for r in rows for p in r["probes"] if p["outcome"] == "oom-kill"]
    lines = [
        f"Start-up and planning leave {min(floors):.2f}-{max(floors):.2f} GiB of anonymous memory "
        "once the output is written (each unlimited run's floor in its last seconds). The inputs "
        "are memory-mapped page cache, reclaimable: the smallest completing limit is "
        f"{min(margins):+.2f} to {max(margins):+.2f} GiB from the peak anonymous memory "
        "(synchronous writes).",
        "",
        *async_lines(rows),
        f"Failed probes: {len(hangs)} hung (not done in the time allowed, killed), {len(ooms)} "
        "were OOM-killed" + (f" (after {min(p['wall_s'] for p in ooms):.0f}-"
                             f"{max(p['wall_s'] for p in ooms):.0f} s)." if ooms else "."),
    ]
    if hangs:
        stalled = [p for p in hangs if hang_kind(p) == "stalled"]
        lines[-1] += (f" Of the hangs, {len(stalled)} had stalled (the progress bar had not moved "
                      "for most of the run) and the rest were crawling (still progressing, far "
                      "slower than unlimited).")
        in_reclaim = [p for p in hangs if any(k.startswith("D ") for k in p["at_timeout"]["threads"])]
        charges = [p["at_timeout"].get("failed_charges") for p in hangs]
        charges = [c for c in charges if c is not None]
        waits = sorted({k[2:] for p in hangs for k in p["at_timeout"]["threads"] if k.startswith("D ")} - {"0"})
        lines[-1] += (
            f" When killed, {len(in_reclaim)} of the {len(hangs)} hung runs had threads in D state"
            + (f" (in {', '.join(f'`{w}`' for w in waits)})" if waits else "")
            + (f", the cgroup had refused {min(charges):,}-{max(charges):,} charges "
               "(memory.failcnt)" if charges else "")
            + ". Reclaiming the memory-mapped inputs always "
            "frees something, which the next page fault reads back, so the kernel's OOM killer "
            "may never act: the merge thrashes instead of stopping."
        )
    return lines + [""]


def async_lines(rows: List[Dict]) -> List[str]:
    """With --async-write: the peak under each limit that completed, against the limit."""
    lines = []
    for r in rows:
        if not (CASES[r["key"]].async_write and r["searched"]):
            continue
        completed = sorted((p["limit_gib"], p["peak_anon_gib"]) for p in r["probes"] if p["outcome"] == "ok")
        pairs = ", ".join(f"{peak:.2f} at {limit:.1f}" for limit, peak in reversed(completed))
        sync = next((s for s in rows if s["key"] == "chain-1b" and s["shape"] == r["shape"]
                     and s["layers"] == r["layers"]), None)
        lines.append(
            f"With --async-write ({r['shape']}, {r['layers']} layers) the peak anonymous memory is "
            f"{r['unlimited']['peak_anon_gib']:.2f} GiB without a limit (output shards wait for the "
            f"writer threads) but falls with the limit in the probes that completed (GiB: {pairs}): "
            "short of memory, fewer shards are waiting."
            + (f" Its smallest completing limit, {r['smallest_completing_gib']:.1f} GiB, is the "
               f"synchronous run's {sync['smallest_completing_gib']:.1f}." if sync and sync["smallest_completing_gib"]
               and r["smallest_completing_gib"] else "")
        )
        lines.append("")
    return lines


def other_method_lines(report: Dict) -> List[str]:
    """The largest-tensor factor stock methods would need in the same model."""
    c = report["model"]["coefficients"]
    lines = []
    for r in report["cases"]:
        if r["recipe"]["merge_method"] == "nearswap_chain" or r["smallest_completing_gib"] is None:
            continue
        t = r["terms"]
        k = (r["smallest_completing_gib"] * GIB - c["constant"] - t["out_shard_bytes"]) / t["largest_tensor_bytes"]
        lines.append(f"- {r['label']}: k = {k:.1f} (the chain: {c['largest tensor']:.2f})")
    if lines:
        lines = ["Stock methods in the same model (C and S as above, k solved from the row): "
                 "their arithmetic makes whole-tensor temporaries.", "", *lines]
    return lines


# --- main ----------------------------------------------------------------------------------


def machine(cgroup_version: int) -> Dict:
    cpu = cpu_model()
    meminfo = dict(l.split(":", 1) for l in Path("/proc/meminfo").read_text().splitlines())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1),
        "swap_gib": round(int(meminfo["SwapTotal"].split()[0]) / 2**20, 1),
        "kernel": platform.release(),
        "cgroup": f"v{cgroup_version}",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@click.command()
@click.option("--work", default=str(HERE / "work" / "memory"), show_default=True, type=click.Path())
@click.option("--results", default=str(HERE / "results"), show_default=True, type=click.Path())
@click.option("--only", multiple=True, help="Run only these cases (keys), e.g. --only chain-1b.")
@click.option("--layers", multiple=True, type=int,
              help="Run only the Llama-2-70B-shaped families with these layer counts (0: none).")
@click.option("--resolution-gib", default=0.1, show_default=True, help="Grid of the limit search.")
@click.option("--timeout-factor", default=3.0, show_default=True,
              help="A probe not finished in this many times the unlimited wall time has failed.")
@click.option("--poll-ms", default=10.0, show_default=True, help="memory.stat polling interval.")
@click.option("--keep-checkpoints", is_flag=True, help="Keep the generated checkpoints for a later run.")
@click.option("--report-only", is_flag=True,
              help="Measure nothing: refit the model to the results' memory.json and rewrite memory.md.")
def main(work, results, only, layers, resolution_gib, timeout_factor, poll_ms, keep_checkpoints,
         report_only):
    """Measure the memory NearSwap merges need; write memory.json and memory.md."""
    if report_only:
        results = Path(results)
        if not (results / "memory.json").exists():
            raise SetupError(f"no memory.json in {results}: run without --report-only first")
        report = json.loads((results / "memory.json").read_text())
        for row in report["cases"]:
            row["unlimited"]["anon_after_merge_gib"] = round(anon_after_merge(row["unlimited"]["timeline"]), 3)
        report["model"] = fit_model(report["cases"])
        write_json(results / "memory.json", report, indent=1)
        write_markdown(results / "memory.md", markdown(report))
        return
    unknown = sorted(set(only) - set(CASES))
    if unknown:
        raise click.BadParameter(f"unknown case {', '.join(unknown)}; cases: {', '.join(CASES)}",
                                 param_hint="--only")
    version, _ = check_cgroups()
    work, results = folders(work, results)
    step = int(round(resolution_gib * GIB))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(version),
        "settings": {"resolution_gib": resolution_gib, "timeout_factor": timeout_factor,
                     "poll_ms": poll_ms, "timeout_floor_s": TIMEOUT_BASE_FLOOR_S, "t": T,
                     "mergekit_yaml": str(BIN / "mergekit-yaml")},
        "builds": [],
        "cases": [],
    }
    start = time.perf_counter()
    margins: List[float] = []
    for shape, searched, unsearched in PLAN:
        keys = [k for k in searched + unsearched if not only or k in only]
        if not keys or (layers and shape.name == LLAMA2_70B.name and shape.layers not in layers):
            continue
        family = build_family(work, shape, any(CASES[k].tokenizer for k in keys))
        built = json.loads((family / "complete.json").read_text())
        report["builds"].append({"family": shape.label, "seconds": built["seconds"],
                                 "reused": built.get("date", "") < report["date"]})
        for key in keys:
            # Start where the cases so far completed, relative to their peak anonymous
            # memory: two probes when that guess is right.
            margin = statistics.median(margins) if margins else 0.05
            row = measure_case(CASES[key], shape, family, work, step, timeout_factor, poll_ms / 1000,
                               margin, search=key in searched)
            report["cases"].append(row)
            if row["smallest_completing_gib"] is not None:
                margins.append(row["smallest_completing_gib"] - row["unlimited"]["peak_anon_gib"])
            write_json(results / "memory.json", report, indent=1)
        if not keep_checkpoints:
            shutil.rmtree(family)
    report["total_s"] = round(time.perf_counter() - start, 1)
    report["model"] = fit_model(report["cases"])
    write_json(results / "memory.json", report, indent=1)
    write_markdown(results / "memory.md", markdown(report))


if __name__ == "__main__":
    main()
