"""lm-eval's requests as the ladder's windows, tokenized exactly as lm-eval's `hf`
backend (`lm_eval.models.huggingface.HFLM`, its defaults) tokenizes them, and
scored as it scores them.

The tokens come from lm-eval's own code: an HFLM is built around the merged model's
config on the meta device (no weight) and the merged tokenizer, and its own
`loglikelihood` and `loglikelihood_rolling` run on each request, with only the
last step, `_loglikelihood_tokens` (the forward), taken over to collect the
(context tokens, continuation tokens) pairs it would have scored. So the
tokenizer's own special tokens (`tok_encode`'s default), the context/continuation
split (`_encode_pair`), the empty-context prefix token, the model length
(`max_length`, resolved from `max_position_embeddings` as HFLM resolves it) and the
rolling windows (`get_rolling_token_windows`, `make_disjoint_window`) are lm-eval's.

Each pair's forward input is HFLM's, `(context + continuation)[-(max_length +
1):][:-1]` (left truncation), and the continuation's tokens are scored at the
input's last positions: the log-softmax there, the sum of the continuation's
log-probabilities (float32, as HFLM sums them) and whether every one is the
greedy token. Pairs whose inputs are the same tokens share one forward (a window):
a multiple-choice question with one-token answers (MMLU's " A" to " D") is
forwarded once, not once per choice, as HFLM's logits cache does. A
`loglikelihood` request's answer is its pair's (sum, greedy); a
`loglikelihood_rolling` request's is the sum of its pairs' sums, in order (as HFLM
adds them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

LOGLIKELIHOOD = "loglikelihood"
ROLLING = "loglikelihood_rolling"
#: The request types the ladder scores (generate_until is refused: tasks.py).
SCORED = (LOGLIKELIHOOD, ROLLING)


@dataclass(frozen=True)
class RequestWindow:
    """One forward: its input ids, and the (pair index, continuation tokens) it
    answers, each continuation scored at the input's last len(tokens) positions."""

    ids: tuple
    answers: Tuple[Tuple[int, tuple], ...]


@dataclass
class RequestSet:
    """The recorded requests (type, args), the windows that score their pairs, and
    which pairs make each request's answer."""

    records: List[Tuple[str, tuple]]
    windows: List[RequestWindow] = field(default_factory=list)
    #: Per record, the indices of its pairs, in order.
    pieces: List[List[int]] = field(default_factory=list)
    pairs: int = 0
    max_length: int = 0
    #: Pairs longer than max_length + 1 tokens, cut on the left.
    truncated: int = 0

    def describe(self) -> dict:
        kinds = [kind for kind, _ in self.records]
        return {
            "loglikelihood": kinds.count(LOGLIKELIHOOD),
            "loglikelihood_rolling": kinds.count(ROLLING),
            "pairs": self.pairs,
            "windows": len(self.windows),
            "tokens": sum(len(w.ids) for w in self.windows),
            "max_length": self.max_length,
            "truncated": self.truncated,
        }

    def answers(self, scored: Sequence[Tuple[float, bool]]) -> Dict[Tuple[str, tuple], object]:
        """(type, args) -> lm-eval's answer, from one row's per-window scores."""
        found = {}
        for (kind, args), pieces in zip(self.records, self.pieces):
            if kind == LOGLIKELIHOOD:
                (piece,) = pieces
                found[(kind, args)] = scored[piece]
            else:
                found[(kind, args)] = sum(scored[piece][0] for piece in pieces)
        return found


class _Args:
    """What lm-eval's models read of a request (an Instance): its args."""

    def __init__(self, args: tuple):
        self.args = args


def tokenizer_model(config, tokenizer):
    """lm-eval's HFLM around the merged model's config (weights on the meta device,
    never run) and a copy of the merged tokenizer (HFLM sets its pad token), its
    forward taken over to collect what it would score."""
    from lm_eval.models.huggingface import HFLM

    from nearswap_mergekit.ladder.weights import empty_model

    class Collecting(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            self.collected.extend((list(context), list(continuation)) for _, context, continuation in requests)
            return [(0.0, False)] * len(requests)

    model = Collecting(pretrained=empty_model(config, torch.float32), tokenizer=copy.deepcopy(tokenizer),
                       batch_size=1)
    model.collected = []
    return model


def prepare(records: Sequence[Tuple[str, tuple]], config, tokenizer) -> RequestSet:
    """The windows of every recorded request, one request at a time through HFLM's
    own tokenization."""
    import logging

    quiet = logging.getLogger("lm_eval.models.huggingface")
    level = quiet.level
    # HFLM warns of a model given as an object, and once per truncated request.
    quiet.setLevel(logging.ERROR)
    try:
        model = tokenizer_model(config, tokenizer)
        found = RequestSet(list(records), max_length=model.max_length)
        by_ids: Dict[tuple, List[Tuple[int, tuple]]] = {}  # forward input -> the pairs it answers
        for kind, args in records:
            model.collected = []
            if kind == LOGLIKELIHOOD:
                model.loglikelihood([_Args(args)], disable_tqdm=True)
            else:
                model.loglikelihood_rolling([_Args(args)], disable_tqdm=True)
            pieces = []
            for context, continuation in model.collected:
                pieces.append(found.pairs)
                found.truncated += len(context) + len(continuation) > model.max_length + 1
                by_ids.setdefault(forward_input(context, continuation, model.max_length), []).append(
                    (found.pairs, tuple(continuation)))
                found.pairs += 1
            found.pieces.append(pieces)
        found.windows = [RequestWindow(ids, tuple(answers)) for ids, answers in by_ids.items()]
    finally:
        quiet.setLevel(level)
    return found


def forward_input(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple:
    """HFLM's forward input for one pair (left-truncated to max_length)."""
    if not context or not continuation or len(continuation) > max_length:
        raise ValueError(f"lm-eval cannot score a pair of {len(context)} context and {len(continuation)} "
                         f"continuation tokens at length {max_length}")
    return tuple((list(context) + list(continuation))[-(max_length + 1):][:-1])


def add_batch(scored: Dict[int, Tuple[float, bool]], group: Sequence[RequestWindow], logits: torch.Tensor) -> None:
    """One batch's answers, from the model's logits for it: per window, the
    log-softmax at the continuation's positions, the sum of the continuation's
    log-probabilities and whether each is the greedy token, all in the logits'
    dtype, as HFLM computes them (its softmax_dtype left at its default)."""
    for row, item in zip(logits, group):
        length = len(item.ids)
        for index, continuation in item.answers:
            count = len(continuation)
            logp = torch.log_softmax(row[length - count : length], dim=-1).unsqueeze(0)  # [1, n, vocab]
            targets = torch.tensor(continuation, dtype=torch.long, device=logp.device).unsqueeze(0)
            greedy = bool((logp.argmax(dim=-1) == targets).all())
            picked = torch.gather(logp, 2, targets.unsqueeze(-1)).squeeze(-1)  # [1, n]
            scored[index] = (float(picked.sum()), greedy)
