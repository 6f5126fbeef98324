"""Deterministic stand-in checkpoints: a base and secondaries with known, small deltas.

Real Llama checkpoints (config.json, model.safetensors, a real tokenizer), tiny
by default, so the stock mergekit CLIs and `transformers` run on them offline.
Used by the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence

import torch
from safetensors.torch import save_file

#: The QuartetAnemoi chain, in merge order (base first), as tiny stand-ins.
QUARTET = ("miqu", "wintergoddess", "aurora-nights", "xwin")

_CORPUS = (
    "NearSwap retains most of the weights of the base model, but when a weight is "
    "similar between the two, it is interpolated to the secondary model value. "
    "A parameter t specifies the sameness threshold. When the distance between two "
    "values is below t, the weight from the secondary model is used. "
    "Once upon a time the four winds told a story to the sea and the sky. "
)


@dataclass(frozen=True)
class TinyLlama:
    """Shape and statistics of a stand-in family of checkpoints."""

    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    weight_std: float = 0.02
    #: Std of each secondary's delta from the base: with 0.01, about 0.8 % of
    #: weights lie within t = 1e-4 of the base, as the QuartetAnemoi card reports.
    delta_std: float = 0.01
    #: Fraction of each secondary's weights left identical to the base.
    identical_fraction: float = 0.01
    dtype: torch.dtype = torch.float16


def build_tokenizer(out_dir: Path):
    """Train a small byte-level BPE tokenizer (deterministic) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>"
    )
    wrapped.save_pretrained(str(out_dir))
    # transformers 5 writes its own backend's class name, which transformers 4
    # (mergekit 0.1.4's) cannot load; the fast-tokenizer class works in both.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return wrapped


def _llama_config(shape: TinyLlama, vocab_size: int) -> Dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "dtype": str(shape.dtype).removeprefix("torch."),
    }


def llama_tensor_shapes(config: Dict) -> Dict[str, tuple]:
    """Names and shapes of a Llama checkpoint's tensors, in file order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes.update(
            {
                f"{prefix}.input_layernorm.weight": (h,),
                f"{prefix}.self_attn.q_proj.weight": (h, h),
                f"{prefix}.self_attn.k_proj.weight": (kv, h),
                f"{prefix}.self_attn.v_proj.weight": (kv, h),
                f"{prefix}.self_attn.o_proj.weight": (h, h),
                f"{prefix}.post_attention_layernorm.weight": (h,),
                f"{prefix}.mlp.gate_proj.weight": (i, h),
                f"{prefix}.mlp.up_proj.weight": (i, h),
                f"{prefix}.mlp.down_proj.weight": (h, i),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _generator(*keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(keys).encode()))


def base_tensor(name: str, shape: tuple, spec: TinyLlama) -> torch.Tensor:
    noise = torch.randn(shape, generator=_generator("base", name)) * spec.weight_std
    if name.endswith("norm.weight"):
        noise += 1.0
    return noise.to(spec.dtype)


def secondary_tensor(
    base: torch.Tensor, name: str, model: str, spec: TinyLlama
) -> torch.Tensor:
    """The base plus a Gaussian delta, with `identical_fraction` of weights unchanged."""
    gen = _generator("secondary", model, name)
    delta = torch.randn(base.shape, generator=gen) * spec.delta_std
    keep = torch.rand(base.shape, generator=gen) < spec.identical_fraction
    result = (base.float() + delta).to(spec.dtype)
    return torch.where(keep, base, result)


def build_family(
    out_dir: Path, names: Sequence[str] = QUARTET, spec: TinyLlama = TinyLlama()
) -> Dict[str, Path]:
    """Write one checkpoint per name under out_dir; the first is the base."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = out_dir / names[0]
    first.mkdir(exist_ok=True)
    tokenizer = build_tokenizer(first)
    config = _llama_config(spec, len(tokenizer))
    shapes = llama_tensor_shapes(config)
    base = {name: base_tensor(name, shape, spec) for name, shape in shapes.items()}
    paths = {}
    for index, model in enumerate(names):
        path = out_dir / model
        path.mkdir(exist_ok=True)
        if index:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (path / name).write_bytes((first / name).read_bytes())
        tensors = (
            base
            if index == 0
            else {n: secondary_tensor(t, n, model, spec) for n, t in base.items()}
        )
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        paths[model] = path
    return paths
