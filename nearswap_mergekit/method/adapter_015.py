"""The `nearswap_chain` merge method for mergekit 0.1.5: a thin adapter over the kernel."""

from __future__ import annotations

import sys

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    OptionalTensorPolicy,
    PerNonBase,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from pydantic import BeforeValidator
from typing_extensions import Annotated

from nearswap_mergekit.method.kernel import nearswap_chain
from nearswap_mergekit.method.spec import (
    METHOD_NAME,
    PRETTY_NAME,
    REFERENCE_URL,
    T_SOURCE_UNKNOWN,
    parse_threshold,
    warn_if_large,
)


def _parse_t(value) -> float:
    try:
        return parse_threshold(value)
    except ValueError as error:
        raise ValueError(f"{error}{_where()}") from None


def _where() -> str:
    """Say whose t is being resolved, and where in the recipe it was written.

    mergekit's parameter resolver validates a value without telling the
    validator whose it is. Its `resolve_parameter` frame holds the model, the
    tensor, and the settings scope the value came from (the recipe's global
    `parameters:` is always the last scope); read them.
    """
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            break
        names = frame.f_locals
        if frame.f_code.co_name == "resolve_parameter" and "tensor_name" in names:
            model, tensor = names.get("model"), names["tensor_name"]
            scopes, scope = tuple(names.get("settings") or ()), names.get("scope")
            if scopes and scope is scopes[-1]:
                source = "the global `parameters:`"
            elif model is not None and scopes and scope is scopes[0]:
                source = f"the `parameters:` of model {model}"
            else:
                source = "a slice's or module's `parameters:`"
            target = f"model {model}, tensor {tensor}" if model is not None else f"tensor {tensor}"
            return f" (for {target}; set in {source}). Fix `t` there"
        frame = frame.f_back
    return f" ({T_SOURCE_UNKNOWN}). Fix `t` where it is set"


#: A stage threshold: a finite float >= 0 (YAML's `1e-4` strings are parsed as numbers).
Threshold = Annotated[float, BeforeValidator(_parse_t)]


class NearSwapChainMethod(FunctionalGroupMergeMethod):
    """mergekit's group method, with a check that names a secondary listed twice."""

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        seen = set()
        for input_id in input_ids:
            if input_id in seen:
                raise ValueError(
                    f"model {input_id} is listed more than once under models; NearSwap "
                    "applies each secondary once: remove the repeat (to run a model twice, "
                    "make a second stage with mergekit-multi)"
                )
            seen.add(input_id)
        super().validate_inputs(input_ids, base_id, group_name=group_name)


@merge_method(
    name=METHOD_NAME,
    pretty_name=PRETTY_NAME,
    reference_url=REFERENCE_URL,
    # A weight only the base has passes through; one missing from some
    # secondaries is merged with the secondaries that have it.
    optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def _nearswap_chain_merge(
    group: TensorGroup,
    t: PerNonBase[Threshold],
    round_stages: bool = True,
) -> torch.Tensor:
    """Sequential NearSwap: the base, then each secondary in the order of `models:`.

    Each stage moves every weight toward its secondary by at most t, and takes
    the secondary's value where the two are within t.
    """
    secondaries = group.non_base
    thresholds = t.values_for(secondaries)
    warn_if_large(thresholds)
    return nearswap_chain(
        group.base.tensor,
        [entry.tensor for entry in secondaries],
        thresholds,
        round_stages=round_stages,
    )


nearswap_chain_merge = NearSwapChainMethod(_nearswap_chain_merge.spec, _nearswap_chain_merge.implementation)
