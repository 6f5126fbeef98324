"""How `nearswap-mergekit ladder` scores a model on a text: one rule, used for every
rung and for any causal language model loaded with transformers. Pure torch and
transformers; no mergekit.

The rule:

- Each text file is read as UTF-8 and tokenized whole with the merged model's
  tokenizer, without special tokens.
- The tokens are cut into windows of at most `context` positions, each scored by
  one forward pass that sees only its own window. Where the tokenizer has a BOS
  token, every window is the BOS followed by the next `context - 1` text tokens
  (the last window may be shorter), and every text token is scored. Without a
  BOS, windows hold `context` text tokens and consecutive windows overlap by one
  token, which is context only in the later window: every text token but the
  file's first is scored.
- In a window, every position after the first is scored given all the positions
  before it: the first position (the BOS, or the overlap token, or the file's
  first token) is context only. `tokens` counts the scored positions.
- Log-probabilities are the log-softmax of the logits in float32; the negative
  log-likelihood of the scored tokens is summed in float64 (nats).

From the sums: perplexity = exp(nll / tokens); bits per byte = nll / ln 2 / the
file's UTF-8 bytes; KL from the base = the mean over scored positions of
KL(base || model) = sum_v p_base(v) (log p_base(v) - log p_model(v)), in nats;
top-1 agreement = the fraction of scored positions where the two models' most
likely next tokens are the same.

Windows of the same length are batched together (several files' windows may
share a batch), so no window is padded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch


class TextError(ValueError):
    """A text file that cannot be scored; the message says which and why."""


def read_text(path: str) -> str:
    """A text file's contents as UTF-8; TextError if missing, empty or not UTF-8."""
    file = Path(path)
    if not file.is_file():
        raise TextError(f"text {path!r} does not exist (give a UTF-8 text file to --text)")
    data = file.read_bytes()
    if not data:
        raise TextError(f"text {path!r} is empty: give a file with text to score")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TextError(
            f"text {path!r} is not UTF-8 (byte {error.start}): convert it, e.g. with iconv -t UTF-8"
        ) from None


def tokenize(tokenizer, text: str) -> List[int]:
    """The whole text's token ids, without special tokens."""
    # verbose=False: a file longer than the model's context is expected here.
    return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))


def bos_of(tokenizer) -> Optional[int]:
    """The tokenizer's BOS token id, or None where it has none."""
    return getattr(tokenizer, "bos_token_id", None)


@dataclass(frozen=True)
class Window:
    """One forward's worth of one text: its token ids, the first context only."""

    text: int
    ids: tuple

    @property
    def scored(self) -> int:
        return len(self.ids) - 1


def windows(ids: Sequence[int], context: int, bos: Optional[int], text: int = 0) -> List[Window]:
    """The windows of one text's token ids under the rule above."""
    if context < 2:
        raise ValueError(f"context must be at least 2 positions; got {context}")
    step = context - 1
    if bos is not None:
        return [Window(text, (bos, *ids[start : start + step])) for start in range(0, len(ids), step)]
    return [Window(text, tuple(ids[start : start + context])) for start in range(0, len(ids) - 1, step)]


def batches(all_windows: Sequence[Window], batch: Optional[int] = None) -> List[List[Window]]:
    """Windows grouped by kind and length (no padding), in order, at most `batch`
    per group (None: all of one kind and length in one group)."""
    by_length: Dict[tuple, List[Window]] = {}
    for window in all_windows:  # a text's windows and a request's (requests.py) apart
        by_length.setdefault((type(window), len(window.ids)), []).append(window)
    groups = []
    for members in by_length.values():
        size = batch or len(members)
        groups += [members[start : start + size] for start in range(0, len(members), size)]
    return groups


def input_ids(group: Sequence[Window], device="cpu") -> torch.Tensor:
    return torch.tensor([window.ids for window in group], dtype=torch.long, device=device)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary, in float32, of the positions that predict a
    scored token (all but the last of each window)."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


@dataclass
class Score:
    """Running sums of one model on one text."""

    nll: float = 0.0
    tokens: int = 0
    kl: float = 0.0
    agree: int = 0

    def report(self, path: str, size: int) -> dict:
        tokens = self.tokens
        return {
            "path": path,
            "nll": self.nll,
            "tokens": tokens,
            "perplexity": math.exp(self.nll / tokens) if tokens else float("nan"),
            "bits_per_byte": self.nll / math.log(2) / size,
            "kl_from_base": self.kl / tokens if tokens else float("nan"),
            "top1_agreement": self.agree / tokens if tokens else float("nan"),
        }


def add_batch(scores: List[Score], group: Sequence[Window], logp: torch.Tensor,
              base_logp: Optional[torch.Tensor] = None) -> None:
    """Add one batch's scores to its texts' sums; `logp` from log_probs(), and the
    base model's on the same batch for the KL and top-1 agreement (the model's own
    when None: KL 0, agreement 1)."""
    targets = input_ids(group, logp.device)[:, 1:]
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (windows, scored)
    nll = -picked.double().sum(-1)
    if base_logp is None:
        kl = torch.zeros_like(nll)
        agree = torch.full_like(nll, targets.shape[1])
    else:
        # KL(base || model) per position, from float32 log-probabilities.
        kl = (base_logp.exp() * (base_logp - logp)).sum(-1).double().sum(-1)
        agree = (base_logp.argmax(-1) == logp.argmax(-1)).double().sum(-1)
    for window, n, k, a in zip(group, nll.tolist(), kl.tolist(), agree.tolist()):
        score = scores[window.text]
        score.nll += n
        score.tokens += window.scored
        score.kl += k
        score.agree += int(a)


def score_model(model: Callable, tokenizer, texts: Sequence[str], context: int,
                batch: Optional[int] = None, device="cpu") -> List[Score]:
    """Score a loaded causal language model on each text (strings) under the rule:
    the reference that `ladder`'s merged-on-access models are held to."""
    bos = bos_of(tokenizer)
    found = [w for i, text in enumerate(texts) for w in windows(tokenize(tokenizer, text), context, bos, i)]
    scores = [Score() for _ in texts]
    with torch.inference_mode():
        for group in batches(found, batch):
            logits = model(input_ids=input_ids(group, device), use_cache=False).logits
            add_batch(scores, group, log_probs(logits))
    return scores


@dataclass
class TextSet:
    """The texts of a ladder: paths, sizes in bytes, token counts and windows."""

    paths: List[str]
    sizes: List[int]
    tokens: List[int]
    windows: List[Window] = field(default_factory=list)

    def describe(self) -> List[dict]:
        return [{"path": p, "bytes": b, "tokens": t} for p, b, t in zip(self.paths, self.sizes, self.tokens)]


def prepare(paths: Sequence[str], contents: Sequence[str], tokenizer, context: int) -> TextSet:
    """Tokenize and window each text; TextError where one leaves nothing to score."""
    bos = bos_of(tokenizer)
    texts = TextSet(list(paths), [len(c.encode("utf-8")) for c in contents], [])
    for index, (path, content) in enumerate(zip(paths, contents)):
        ids = tokenize(tokenizer, content)
        found = windows(ids, context, bos, index)
        if not any(w.scored for w in found):
            raise TextError(
                f"text {path!r} is {len(ids)} token(s) long: nothing to score (a tokenizer "
                "without a BOS needs 2 tokens); give a longer text"
            )
        texts.tokens.append(len(ids))
        texts.windows += found
    return texts
