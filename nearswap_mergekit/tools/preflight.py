"""`nearswap-mergekit check`: what a recipe's merge would meet, from headers alone.

Reads recipes with mergekit's own configuration classes, checkpoints' safetensors
headers and config.json files, the local Hugging Face cache and the free space of
filesystems; never a weight, never the network. Each finding is a `Finding`:
a problem (the merge would fail or go wrong), a warning, "not checked" (what
cannot be known offline), or plain information.
"""

from __future__ import annotations

import difflib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from nearswap_mergekit.method.spec import CARD_GARBAGE_T, METHOD_NAME, parse_threshold
from nearswap_mergekit.plan.reader import SAFETENSORS_DTYPES
from nearswap_mergekit.plan import validation
from nearswap_mergekit.plan.recipe import Plan, RecipeError
from nearswap_mergekit.plan.validation import INFO, NOT_CHECKED, PROBLEM, WARNING, Finding

#: Read rate (bytes/s) of a whole chain merge from disk, start-up included, when the
#: user gives none: benchmarks/run.py on a 2-core Intel Xeon with a virtual disk.
MEASURED_READ_RATE = 0.43e9
MEASURED_ON = "a 2-core Intel Xeon reading from its virtual disk"


@dataclass
class Checkpoint:
    """What the headers of one model say."""

    reference: str
    folder: Optional[Path]  # None: not on this machine
    file_bytes: int = 0
    tensors: Dict[str, tuple] = field(default_factory=dict)  # name -> (dtype, shape)
    vocab_size: Optional[int] = None

    def tensor_bytes(self, name: str, dtype: Optional[str] = None) -> int:
        stored, shape = self.tensors[name]
        count = 1
        for size in shape:
            count *= size
        # A recipe's `dtype:` is a torch name; a header's, safetensors' (the reader's table).
        element = getattr(torch, dtype) if dtype else SAFETENSORS_DTYPES[stored]
        return count * element.itemsize


@dataclass
class Report:
    findings: List[Finding] = field(default_factory=list)

    def add(self, kind: str, text: str) -> None:
        self.findings.append(Finding(kind, text))

    @property
    def problems(self) -> List[Finding]:
        return [f for f in self.findings if f.kind == PROBLEM]


#: The memory model fitted by benchmarks/memory.py to mergekit-yaml runs under cgroup
#: limits (benchmarks/results/memory.md): need = C + S (1 + a w) + k T + v V.
NEED_CONSTANT_BYTES = 0.43 * 2**30  # start-up and planning (0.30 GiB measured), margin
NEED_LARGEST_TENSOR_FACTOR = 0.90
NEED_ALIGNED_VOCABULARY_FACTOR = 0.89
NEED_ASYNC_SHARDS_PER_WRITE_THREAD = 0.07  # fitted at 2 write threads only


def predicted_need_bytes(largest_tensor_bytes: int, out_shard_bytes: int, async_write: bool = False,
                         write_threads: int = 1, vocab_aligned_bytes: int = 0) -> int:
    """The memory limit under which a `nearswap_chain` merge by mergekit-yaml (CPU)
    completes (anonymous memory; page cache comes on top and is not needed): the
    start-up, the output shard waiting in RAM (`out_shard_bytes`, the smaller of
    --out-shard-size and the whole output), the largest tensor, and under
    `tokenizer:` the aligned copies of one vocabulary tensor (models x rows x hidden
    x bytes). Within 0.0-0.43 GiB above every measured need, never below."""
    shards = 1.0 + (NEED_ASYNC_SHARDS_PER_WRITE_THREAD * write_threads if async_write else 0.0)
    return int(NEED_CONSTANT_BYTES + shards * out_shard_bytes
               + NEED_LARGEST_TENSOR_FACTOR * largest_tensor_bytes
               + NEED_ALIGNED_VOCABULARY_FACTOR * vocab_aligned_bytes)


def read_checkpoint(reference: str, folder: Path) -> Checkpoint:
    """Names, dtypes and shapes from the safetensors headers; sizes of the files."""
    from safetensors import safe_open

    found = Checkpoint(reference, folder)
    config = folder / "config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        found.vocab_size = settings.get("vocab_size") or settings.get("text_config", {}).get("vocab_size")
    for weights in sorted(folder.glob("*.safetensors")):
        found.file_bytes += weights.stat().st_size
        with safe_open(str(weights), "pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                found.tensors[name] = (piece.get_dtype(), tuple(piece.get_shape()))
    for weights in sorted(folder.glob("*.bin")):
        found.file_bytes += weights.stat().st_size
    return found


def free_bytes(path: Path) -> int:
    """Free space of the filesystem that holds `path` (or would hold it)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def gb(count: float) -> str:
    return f"{count / 1e9:,.1f} GB"


def check(plan: Plan, out: Optional[Path], read_rate: float = MEASURED_READ_RATE,
          workdir: Optional[Path] = None) -> Report:
    """Everything `check` reports about the plan's recipe run into OUT with the plan's
    mergekit options (a MergeOptions). Model paths resolve against `workdir` (the
    folder mergekit-yaml runs in)."""
    from mergekit.config import MergeConfiguration

    from nearswap_mergekit.method.registration import inspect

    report = Report()
    workdir = workdir or Path.cwd()
    # Importing mergekit's merge methods here runs the start-up hook as it runs in
    # mergekit-yaml (same interpreter, same site-packages, same environment).
    target = inspect("mergekit")
    known_methods = _method_names()
    if METHOD_NAME in known_methods:
        report.add(INFO, f"{METHOD_NAME} is registered with {target.describe()}")
    else:
        report.add(PROBLEM, f"{METHOD_NAME} is not registered with {target.describe()}: "
                            "mergekit-yaml would say 'Unimplemented merge method'; install "
                            "nearswap-mergekit into the environment that runs mergekit-yaml "
                            "(or unset NEARSWAP_MERGEKIT_NO_HOOK)")

    try:
        stages = plan.documents
    except RecipeError as error:  # missing, not UTF-8, not YAML
        report.add(PROBLEM, str(error))
        return report
    shape = validation.document_problems(plan.path, stages)
    for text in shape:
        report.add(PROBLEM, text)
    if shape:
        return report
    stage_names = {doc.get("name") for doc in stages if doc.get("name")}
    checkpoints: Dict[str, Checkpoint] = {}
    to_download: List[str] = []
    for index, doc in enumerate(stages, 1):
        where = validation.where_of(index, doc, len(stages))
        body = {k: v for k, v in doc.items() if k != "name"}
        # The t rule first: some mergekits' configuration refuses a t that is not a
        # number itself, in pydantic's words, which name no model.
        bad_t = validation.threshold_problems(plan.path, body, where) if body.get("merge_method") == METHOD_NAME else []
        for text in bad_t:
            report.add(PROBLEM, text)
        try:
            config = MergeConfiguration.model_validate(body)
        except Exception as error:
            if not bad_t:
                report.add(PROBLEM, f"{where}: mergekit cannot read it: {validation.pydantic_summary(error)}")
            continue
        if config.merge_method not in known_methods:
            close = difflib.get_close_matches(config.merge_method, known_methods, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            report.add(PROBLEM, f"{where}: merge_method {config.merge_method!r} is not a merge "
                                f"method of this mergekit{hint}")
        for _model, where_t, raw in validation.thresholds(body):
            try:
                t = parse_threshold(raw)
            except ValueError:
                continue  # a problem, said above
            if t >= CARD_GARBAGE_T:
                report.add(WARNING, f"{where}: t = {t:g} ({where_t}) is >= {CARD_GARBAGE_T}, where "
                                    "the QuartetAnemoi card saw ~18 % of weights fully swapped per "
                                    "pass and garbage output on its 70B models; see `nearswap-mergekit "
                                    "stats` and `ladder` before you use it")
        for text in validation.model_texts(body):
            if text in stage_names or text in checkpoints or text in to_download:
                continue
            found = validation.locate_model(text, workdir)
            if found.folder is not None and found.finding is None:  # a local folder
                if validation.looks_like_hub_id(found.path):
                    report.add(PROBLEM, f"model {text}: a local folder, but mergekit takes "
                                        f"'{found.path}' for a Hub id (its model card asks the Hub, which "
                                        f"fails offline): write it as './{found.path}'")
                checkpoints[text] = read_checkpoint(text, found.folder)
            elif found.folder is not None:  # in the Hugging Face cache
                checkpoints[text] = read_checkpoint(text, found.folder)
                report.add(INFO, f"{found.finding.text}, {gb(checkpoints[text].file_bytes)}")
            else:
                if found.finding.kind == NOT_CHECKED:
                    to_download.append(text)
                report.add(found.finding.kind, found.finding.text)
        _compare_models(report, where, body, [checkpoints[t] for t in validation.model_texts(body)
                                              if t in checkpoints])

    _resources(report, stages, checkpoints, to_download, out, plan.options, read_rate)
    return report


def _method_names() -> List[str]:
    from mergekit import merge_methods

    if hasattr(merge_methods, "registered_methods"):
        return [m.spec.name for m in merge_methods.registered_methods()]
    return list(merge_methods.REGISTERED_MERGE_METHODS)


def _compare_models(report: Report, where: str, doc: dict, found: List[Checkpoint]) -> None:
    if len(found) < 2:
        return
    vocabularies = {c.reference: c.vocab_size for c in found if c.vocab_size}
    if len(set(vocabularies.values())) > 1:
        sizes = ", ".join(f"{name} {size}" for name, size in vocabularies.items())
        if doc.get("tokenizer") or doc.get("tokenizer_source"):
            report.add(INFO, f"{where}: vocabularies differ ({sizes}); `tokenizer:` aligns them")
        else:
            report.add(PROBLEM, f"{where}: vocabularies differ ({sizes}): add `tokenizer:` with "
                                "`source: base` (mergekit aligns the embeddings then)")
    base = found[0]
    dtypes = {c.reference: sorted({d for d, _ in c.tensors.values()}) for c in found}
    if len({tuple(v) for v in dtypes.values()}) > 1:
        report.add(INFO, f"{where}: dtypes differ ({dtypes}); the merge computes in "
                         f"{doc.get('dtype') or 'the base model dtype'}")
    vocab_tensors = _vocabulary_tensors(base)
    for other in found[1:]:
        mismatched = [name for name, (_, shape) in base.tensors.items()
                      if name in other.tensors and other.tensors[name][1] != shape
                      and name not in vocab_tensors]
        if mismatched:
            report.add(PROBLEM, f"{where}: {len(mismatched)} tensor(s) of {other.reference} have other "
                                f"shapes than the base's, e.g. {mismatched[0]} "
                                f"{other.tensors[mismatched[0]][1]} vs {base.tensors[mismatched[0]][1]}")


def _vocabulary_tensors(checkpoint: Checkpoint) -> set:
    """Tensors whose first dimension is the vocabulary (embeddings, lm_head)."""
    if not checkpoint.vocab_size:
        return set()
    return {name for name, (_, shape) in checkpoint.tensors.items()
            if shape and shape[0] in range(checkpoint.vocab_size - 1024, checkpoint.vocab_size + 1025)
            and ("embed" in name or "lm_head" in name or "wte" in name)}


def _resources(report: Report, stages: List[dict], checkpoints: Dict[str, Checkpoint],
               to_download: List[str], out: Optional[Path], options, read_rate: float) -> None:
    """RAM, disk, downloads and time of the last stage's output (the merge OUT holds)."""
    last = stages[-1]
    base_text = str(last.get("base_model") or "")
    base = checkpoints.get(base_text)
    dtype = last.get("dtype")
    known_inputs = sum(c.file_bytes for c in checkpoints.values())
    if to_download:
        report.add(NOT_CHECKED, f"downloads: {len(to_download)} Hub model(s) are not in the cache; "
                                "their size is not known offline")
    if base is None:
        report.add(NOT_CHECKED, "RAM, output size and time: the base model is not on this machine "
                                "(the 4 x 70B quartet's figures: nearswap-mergekit check --help)")
        return
    output_bytes = sum(base.tensor_bytes(name, dtype) for name in base.tensors)
    largest = max((base.tensor_bytes(name, dtype) for name in base.tensors), default=0)
    vocabulary = max((base.tensor_bytes(name, dtype) for name in _vocabulary_tensors(base)), default=0)
    aligned = vocabulary * len(validation.model_texts(last)) if last.get("tokenizer") else 0
    shard = min(options.out_shard_size, output_bytes)
    need = predicted_need_bytes(largest, shard, options.async_write, options.write_threads, aligned)
    report.add(INFO, f"RAM: about {need / 2**30:.1f} GiB of anonymous memory (output shard "
                     f"{gb(shard)} held until written, largest tensor {gb(largest)}); page cache "
                     "comes on top and is not needed; with less, a merge can hang rather than stop")
    if options.out_shard_size > 1e9 and output_bytes > 1e9:
        report.add(INFO, "--out-shard-size 1B keeps the output shard waiting in RAM to 1 GB")
    report.add(INFO, f"disk: the output takes {gb(output_bytes)} ({output_bytes:,} bytes of tensors)")
    # Models not on this machine are taken to be the size of the base.
    inputs = known_inputs + base.file_bytes * len(to_download)
    guessed = " (models not here taken to be the base's size)" if to_download else ""
    report.add(INFO, f"time: about {inputs / read_rate / 60:.0f} min to read {gb(inputs)} of inputs"
                     f"{guessed} at {gb(read_rate)}/s, measured on {MEASURED_ON}; "
                     "--read-rate sets yours")
    if out is None:
        return
    if out.exists() and any(out.iterdir()):
        count = sum(1 for _ in out.iterdir())
        report.add(PROBLEM, f"{out} is not empty ({count} entries): an earlier or partial merge; "
                            "delete it or choose another folder")
    free = free_bytes(out)
    if free < output_bytes:
        report.add(PROBLEM, f"{out}: {gb(free)} free, the output needs {gb(output_bytes)}")
    else:
        report.add(INFO, f"{out}: {gb(free)} free for the {gb(output_bytes)} output")
    if to_download:
        report.add(INFO, f"Hugging Face cache {validation.hf_cache_folder()}: {gb(free_bytes(validation.hf_cache_folder()))} free")
