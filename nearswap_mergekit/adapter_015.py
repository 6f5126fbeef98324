"""The `nearswap_chain` merge method for mergekit 0.1.5: a thin adapter over the kernel."""

from __future__ import annotations

import sys

import torch
from pydantic import AfterValidator, BeforeValidator
from typing_extensions import Annotated

from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    OptionalTensorPolicy,
    PerNonBase,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from nearswap_mergekit.kernel import check_threshold, nearswap_chain

METHOD_NAME = "nearswap_chain"
REFERENCE_URL = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"


def _as_number(value):
    """Accept numbers and numeric strings (YAML reads `1e-4` as a string)."""
    if isinstance(value, bool):
        raise ValueError(f"t must be a number, not the boolean {value}{_where()}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"t must be a number; got {value!r}{_where()}") from None
    return value


def _check_t(value: float) -> float:
    try:
        return check_threshold(value, "NearSwap threshold t")
    except ValueError as error:
        raise ValueError(
            f"{error}{_where()}. Fix `t` under `parameters:` (global, or under that model)"
        ) from None


def _where() -> str:
    """Name the model and tensor whose t is being resolved, where mergekit says.

    mergekit's parameter resolver validates a value without telling the
    validator whose it is, so the error would not name the model. Its
    `resolve_parameter` frame holds `model` and `tensor_name`; read them.
    """
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            break
        if frame.f_code.co_name == "resolve_parameter" and "tensor_name" in frame.f_locals:
            model = frame.f_locals.get("model")
            tensor = frame.f_locals["tensor_name"]
            owner = f"model {model}" if model is not None else "the global parameters"
            return f" (for {owner}, tensor {tensor})"
        frame = frame.f_back
    return ""


#: A stage threshold: a finite float >= 0 (YAML's `1e-4` strings are parsed as numbers).
Threshold = Annotated[float, BeforeValidator(_as_number), AfterValidator(_check_t)]


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
    pretty_name="NearSwap chain",
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
    return nearswap_chain(
        group.base.tensor,
        [entry.tensor for entry in secondaries],
        t.values_for(secondaries),
        round_stages=round_stages,
    )


nearswap_chain_merge = NearSwapChainMethod(_nearswap_chain_merge.spec, _nearswap_chain_merge.implementation)
