"""Checkpoints as `compare` and `hash` read them, and manifests.

Checkpoints are read through mergekit's own index and loader (safetensors,
sharded or not, and pickled .bin), one tensor at a time; safetensors tensors are
memory-mapped, so a row sample touches only its rows (and what the operating
system reads ahead around them). `hash` writes a manifest of per-tensor SHA-256
digests that can be published beside a model and compared against without it.

- tensor digest: SHA-256 of the ASCII header "<dtype>[<d0>,<d1>,...]\\n" (torch's
  dtype name, e.g. "bfloat16[8192,28672]\\n"; "float32[]\\n" for a scalar)
  followed by the elements' raw bytes, little-endian, in C order. It does not
  depend on how the model is sharded or on the file format.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple, Union

import torch
from tqdm import tqdm

from nearswap_mergekit import __version__

MANIFEST_FORMAT = "nearswap-mergekit-manifest/1"
HASH_DEFINITION = (
    "sha256 of the ASCII header '<dtype>[<d0>,<d1>,...]\\n' (torch's dtype name) "
    "followed by the elements' bytes, little-endian, C order"
)
#: Elements compared at once: bounds the temporaries (a few bytes per element).
BLOCK_ELEMENTS = 1 << 20
#: Bytes handed to SHA-256 at once.
HASH_CHUNK_BYTES = 1 << 26
#: Differing tensors named in the verdict line (all of them are in the JSON report).
NAMED_IN_VERDICT = 10
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: The files mergekit's ShardedTensorIndex.from_disk looks for in a model folder.
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
#: An integer dtype of each element size: its view of a tensor holds the raw bits.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class InputError(ValueError):
    """Input that cannot be compared or hashed; the message names it and the fix."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without the module: 'bfloat16', 'float16', ..."""
    return str(dtype).removeprefix("torch.")


def natural_key(name: str) -> list:
    """Sort key putting layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- sources


class Checkpoint:
    """A model's tensors, read one at a time through mergekit's loader.

    safetensors tensors come back memory-mapped (nothing is read until touched);
    a pickled .bin tensor is read whole by mergekit's lazy unpickler."""

    def __init__(self, spec: str, folder: str):
        from mergekit.io import LazyTensorLoader, ShardedTensorIndex

        self.spec, self.folder = spec, folder
        if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, name))
                                             for name in MODEL_FILES):
            raise InputError(f"{spec}: no {', '.join(MODEL_FILES[:-1])} or {MODEL_FILES[-1]} "
                             "in this folder")
        try:
            if os.path.isdir(folder):
                index = ShardedTensorIndex.from_disk(folder)
            else:
                index = ShardedTensorIndex.from_file(folder)
        except Exception as error:  # a broken index or a truncated file
            raise InputError(f"{spec}: cannot read it: {type(error).__name__}: {error}") from None
        missing = [s.filename for s in index.shards
                   if not os.path.isfile(os.path.join(index.base_path, s.filename))]
        if missing:
            raise InputError(f"{spec}: shard {missing[0]} named in its index is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if not index.tensor_paths:
            raise InputError(f"{spec}: holds no tensors")
        self.loader = LazyTensorLoader(index, lazy_unpickle=True)
        # Shard by shard, so that each shard is opened once per pass.
        self.names = [name for shard in index.shards for name in shard.contained_keys]

    def tensor(self, name: str) -> torch.Tensor:
        return self.loader.get_tensor(name)

    def describe(self) -> str:
        return f"{self.spec} (checkpoint, {len(self.names)} tensors)"


@dataclass(frozen=True)
class ManifestEntry:
    dtype: str
    shape: Tuple[int, ...]
    sha256: str


class Manifest:
    """A manifest written by `hash`: per tensor its dtype, shape and digest."""

    def __init__(self, spec: str, entries: Dict[str, ManifestEntry], source: str = ""):
        self.spec, self.entries, self.source = spec, entries, source
        self.names = list(entries)

    @classmethod
    def read(cls, path: str) -> "Manifest":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: not a readable JSON manifest ({error})") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise InputError(
                f"{path}: not a {MANIFEST_FORMAT} manifest (write one with "
                "`nearswap-mergekit hash MODEL -o MANIFEST.json`; for a checkpoint give its folder)"
            )
        tensors = data.get("tensors")
        if not isinstance(tensors, dict) or not tensors:
            raise InputError(f"{path}: the manifest lists no tensors")
        entries = {}
        for name, entry in tensors.items():
            try:
                shape = tuple(entry["shape"])
                valid = (isinstance(entry["dtype"], str) and _SHA256.fullmatch(entry["sha256"])
                         and all(type(d) is int and d >= 0 for d in shape))
            except (KeyError, TypeError):
                valid = False
            if not valid:
                raise InputError(f"{path}: tensor {name!r} needs a dtype, a shape (a list of "
                                 "sizes) and a sha256 (64 hex digits)")
            entries[name] = ManifestEntry(entry["dtype"], shape, entry["sha256"])
        return cls(path, entries, str(data.get("source", "")))

    def describe(self) -> str:
        return f"{self.spec} (manifest of {self.source or 'an unnamed model'}, {len(self.names)} tensors)"


Side = Union[Checkpoint, Manifest]


def _looks_like_hub_id(spec: str) -> bool:
    """'org/name' or 'org/name@revision', as the Hub names models."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", spec) is not None and not spec.startswith(".")


def _hub_folder(spec: str) -> str:
    """The local folder of a Hub model: the Hugging Face cache's copy, else the one
    mergekit downloads (as mergekit-yaml would; not with HF_HUB_OFFLINE=1)."""
    import huggingface_hub
    from mergekit.common import ModelReference

    reference = ModelReference.parse(spec)
    if reference.lora is not None:
        raise InputError(f"{spec}: a LoRA reference; merge the adapter into the model first")
    path, revision = reference.model.path, reference.model.revision
    try:
        # mergekit's local_path() asks the Hub for the file list first, which fails
        # offline even for a cached model: look in the cache first.
        return huggingface_hub.snapshot_download(path, revision=revision, local_files_only=True)
    except Exception:
        pass
    try:
        return reference.local_path()
    except Exception as error:
        raise InputError(
            f"{spec}: no such file or folder, and no Hub model of that name in the local "
            f"Hugging Face cache ({type(error).__name__}); give a local path, or download it "
            f"first (`hf download {path}`)"
        ) from None


def open_checkpoint(spec: str) -> Checkpoint:
    """A checkpoint: a model folder, a single .safetensors/.bin file, or a Hub id."""
    if os.path.exists(spec):
        if os.path.isfile(spec) and not spec.lower().endswith((".safetensors", ".bin")):
            raise InputError(f"{spec}: not a checkpoint (give a model folder, a .safetensors "
                             "or .bin file, or a Hub id)")
        return Checkpoint(spec, spec)
    if not _looks_like_hub_id(spec):
        raise InputError(f"{spec}: no such file or folder")
    return Checkpoint(spec, _hub_folder(spec))


def open_side(spec: str) -> Side:
    """A checkpoint (see open_checkpoint) or a manifest written by `hash` (a file
    that is neither .safetensors nor .bin)."""
    if os.path.isfile(spec) and not spec.lower().endswith((".safetensors", ".bin")):
        return Manifest.read(spec)
    return open_checkpoint(spec)


# --------------------------------------------------------------------------- hashing


def _little_endian_bytes(flat: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous 1-D tensor, little-endian."""
    if sys.byteorder == "little" or flat.element_size() == 1:
        return memoryview(flat.view(torch.uint8).numpy())
    # A complex number is two floats, each swapped on its own.
    size = flat.element_size() // (2 if flat.is_complex() else 1)
    ints = flat.view(torch.uint8).view(_BITS[size]).numpy()
    return memoryview(ints.byteswap())


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of the header '<dtype>[<d0>,...]\\n' and the raw little-endian C-order
    bytes, fed in chunks (a memory-mapped tensor is read as it is hashed)."""
    digest = hashlib.sha256(
        f"{dtype_name(tensor.dtype)}[{','.join(map(str, tensor.shape))}]\n".encode("ascii")
    )
    flat = tensor.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    step = max(1, HASH_CHUNK_BYTES // max(1, flat.element_size()))
    for start in range(0, flat.numel(), step):
        digest.update(_little_endian_bytes(flat[start : start + step]))
    return digest.hexdigest()


def hash_checkpoint(checkpoint: Checkpoint, progress: bool = True) -> dict:
    """The manifest of a checkpoint: per tensor its dtype, shape and digest."""
    tensors = {}
    for name in tqdm(checkpoint.names, unit="tensor", desc="hashing", disable=not progress):
        tensor = checkpoint.tensor(name)
        tensors[name] = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                         "sha256": tensor_digest(tensor)}
        del tensor  # one tensor at a time
    folder = checkpoint.folder
    return {
        "format": MANIFEST_FORMAT,
        "source": checkpoint.spec if not os.path.exists(checkpoint.spec) else os.path.abspath(folder),
        "nearswap_mergekit_version": __version__,
        "hash": HASH_DEFINITION,
        "tensors": dict(sorted(tensors.items(), key=lambda item: natural_key(item[0]))),
    }


def manifest_text(manifest: dict) -> str:
    """A manifest as JSON with one line per tensor, so that two manifests diff by line."""
    head = {key: value for key, value in manifest.items() if key != "tensors"}
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in head.items()]
    entries = [f"    {json.dumps(name)}: {json.dumps(entry)}" for name, entry in manifest["tensors"].items()]
    return "{\n" + "\n".join(lines) + '\n  "tensors": {\n' + ",\n".join(entries) + "\n  }\n}\n"


def write_json(data: dict, path: str) -> None:
    """Write a manifest (one line per tensor) or a report, whole or not at all."""
    text = manifest_text(data) if data.get("format") == MANIFEST_FORMAT else json.dumps(data, indent=1) + "\n"
    partial = Path(f"{path}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
