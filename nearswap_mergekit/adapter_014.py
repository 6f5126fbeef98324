"""The `nearswap_chain` merge method for mergekit 0.1.4: a thin adapter over the kernel.

mergekit 0.1.4's `easy_define` passes secondaries as an unordered set, so this is
a MergeMethod with its own task that keeps the order of the recipe's `models:`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.graph import Task
from mergekit.merge_methods.base import ConfigParameterDef, MergeMethod, MergeTensorInput
from nearswap_mergekit.kernel import nearswap_chain
from nearswap_mergekit.spec import (
    METHOD_NAME,
    PRETTY_NAME,
    REFERENCE_URL,
    T_SOURCE_UNKNOWN,
    parse_threshold,
)


class NearSwapChainTask(Task[torch.Tensor]):
    gather_tensors: MergeTensorInput
    base_model: ModelReference
    secondaries: Tuple[ModelReference, ...]
    thresholds: Tuple[float, ...]
    round_stages: bool
    weight_name: str

    def arguments(self) -> Dict[str, Task]:
        return {"tensors": self.gather_tensors}

    def uses_accelerator(self) -> bool:
        return True

    def group_label(self) -> Optional[str]:
        return self.gather_tensors.group_label()

    def execute(self, tensors: Dict[ModelReference, torch.Tensor], **_kwargs) -> torch.Tensor:
        if self.base_model not in tensors:
            raise RuntimeError(
                f"nearswap_chain: base model {self.base_model} has no tensor {self.weight_name}"
            )
        # A weight missing from some secondaries is merged with those that have it.
        present = [(m, t) for m, t in zip(self.secondaries, self.thresholds) if m in tensors]
        base = tensors[self.base_model]
        if not present:
            return base
        buffer = _non_floating_buffer(base, [tensors[m] for m, _ in present], self.weight_name)
        if buffer is not None:
            return buffer
        shapes = {tuple(tensors[m].shape) for m, _ in present} | {tuple(base.shape)}
        if len(shapes) > 1:
            raise RuntimeError(f"Tensor size mismatch for {self.weight_name}, sizes: {sorted(shapes)}")
        return nearswap_chain(
            base,
            [tensors[m] for m, _ in present],
            [t for _, t in present],
            round_stages=self.round_stages,
        )


class NearSwapChainMerge(MergeMethod):
    def name(self) -> str:
        return METHOD_NAME

    def pretty_name(self) -> Optional[str]:
        return PRETTY_NAME

    def reference_url(self) -> Optional[str]:
        return REFERENCE_URL

    def parameters(self) -> List[ConfigParameterDef]:
        return [ConfigParameterDef(name="round_stages", required=False, default_value=True)]

    def tensor_parameters(self) -> List[ConfigParameterDef]:
        return [ConfigParameterDef(name="t", required=True)]

    def make_task(
        self,
        *,
        output_weight: WeightInfo,
        tensors: MergeTensorInput,
        parameters: ImmutableMap[str, Any],
        tensor_parameters: ImmutableMap[ModelReference, ImmutableMap[str, Any]],
        base_model: Optional[ModelReference],
        **_kwargs,
    ) -> Task:
        if base_model is None:
            raise ValueError("nearswap_chain requires a base model: set base_model in the recipe")
        if not isinstance(tensor_parameters.data, dict):
            raise RuntimeError("nearswap_chain: mergekit did not keep the order of `models:`")
        secondaries = tuple(m for m in tensor_parameters.data if m != base_model)
        if not secondaries:
            raise ValueError(
                "nearswap_chain requires at least one secondary: list models besides the base model"
            )
        thresholds = tuple(
            _threshold(tensor_parameters[m]["t"], m, output_weight.name) for m in secondaries
        )
        return NearSwapChainTask(
            gather_tensors=tensors,
            base_model=base_model,
            secondaries=secondaries,
            thresholds=thresholds,
            round_stages=_flag(parameters["round_stages"]),
            weight_name=output_weight.name,
        )


def _threshold(value: Any, model: ModelReference, tensor: str) -> float:
    try:
        return parse_threshold(value)
    except ValueError as error:
        # mergekit 0.1.4 hands over the resolved value, not where it was set.
        raise ValueError(
            f"{error} (for model {model}, tensor {tensor}; {T_SOURCE_UNKNOWN}). "
            "Fix `t` where it is set"
        ) from None


def _non_floating_buffer(base: torch.Tensor, others: List[torch.Tensor], name: str):
    """Integer and boolean buffers pass through when every input agrees, as in
    mergekit 0.1.5; None for floating-point weights."""
    if base.is_floating_point() and all(t.is_floating_point() for t in others):
        return None
    if any(t.dtype != base.dtype or not torch.equal(t, base) for t in others):
        raise ValueError(
            f"non-floating buffer {name!r} differs between inputs; resolve it before merging"
        )
    return base.clone()


def _flag(value: Any) -> bool:
    # mergekit 0.1.4 hands booleans on as numbers (false -> 0.0).
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"round_stages must be true or false; got {value!r}")


nearswap_chain_merge = NearSwapChainMerge()
