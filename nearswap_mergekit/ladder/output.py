"""Where a ladder runs, and what mergekit-yaml would write beside the weights:
the merged model's config and tokenizer."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from nearswap_mergekit.ladder.rungs import LadderError
from nearswap_mergekit.plan import planning


def execution_device(name: str) -> torch.device:
    """The device the merges and forwards run on: "cpu", or "cuda" (the current one)."""
    if name == "cuda":
        if not torch.cuda.is_available():
            raise LadderError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device; "
                              "use --device cpu, or a CUDA build of torch on a machine with a GPU")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


# ---------------------------------------------------------------------------
# The merged model's config and tokenizer, as mergekit-yaml writes them


@dataclass
class OutputModel:
    """What mergekit-yaml would write beside the weights: config and tokenizer."""

    config: object
    tokenizer: object

    @property
    def positions(self) -> Optional[int]:
        return getattr(self.config, "max_position_embeddings", None)


def output_model(config, options) -> OutputModel:
    """mergekit's output config (the base's, dtype set, vocabulary size set from the
    built tokenizer) and the output tokenizer: the one mergekit builds under
    `tokenizer:` / `tokenizer_source:`, else the base's, which it copies."""
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.merge import _get_donor_model, _update_config_vocab
    from mergekit.plan import MergePlanner

    arch_info = get_architecture_info(config, options)
    # A copy: mergekit's model references cache their configs, which it edits here.
    out_config = copy.deepcopy(planning.output_config(config, arch_info, options))
    # The planner builds its tokenizer task in its constructor: the same task the
    # merge runs, without planning anything.
    task = MergePlanner(config, arch_info, options=options, out_model_config=out_config)._tokenizer_task
    if task is not None:
        try:
            ((_, info),) = Executor([task]).run(quiet=True)
        except Exception as error:
            raise LadderError(
                f"mergekit cannot build the merged tokenizer: {type(error).__name__}: {error} "
                "(every model of a recipe with `tokenizer:` needs its tokenizer)"
            ) from None
        tokenizer = info.tokenizer
        pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
        _update_config_vocab(out_config, arch_info, tokenizer, pad_to_multiple_of=pad)
        return OutputModel(out_config, tokenizer)
    from transformers import AutoTokenizer

    donor, path = _get_donor_model(config, options)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    except Exception as error:
        raise LadderError(
            f"the base model {donor} has no tokenizer that transformers can load "
            f"({type(error).__name__}); the merge would copy the base's: add its tokenizer files to {path}"
        ) from None
    return OutputModel(out_config, tokenizer)
