"""The `nearswap_chain` merge method for mergekit 0.1.4's merge-method API: a thin
adapter over the kernel.

That API (a `MergeMethod` whose `make_task` builds a `Task`, kept in the dict
`REGISTERED_MERGE_METHODS`) is the one of mergekit 0.1.4, of mergekit's GitHub main
(2026) and of mergekitty, mergekit's fork, which has the same modules under another
package name. `method_for(package)` builds the method against either package.

mergekit 0.1.4's `easy_define` passes secondaries as an unordered set, so this is
a MergeMethod with its own task that keeps the order of the recipe's `models:`.
"""

# No `from __future__ import annotations`: the classes are made inside
# method_for(), and pydantic reads their field types where they are defined.

import functools
import importlib
from typing import Any, Dict, List, Optional, Tuple

import torch

from nearswap_mergekit.method.kernel import nearswap_chain
from nearswap_mergekit.method.spec import (
    METHOD_NAME,
    PRETTY_NAME,
    REFERENCE_URL,
    T_SOURCE_UNKNOWN,
    parse_threshold,
    warn_if_large,
)

#: Where each package keeps mergekit's `Task` (the rest has the same module names).
TASK_MODULE = {"mergekit": "mergekit.graph", "mergekitty": "mergekitty.task"}


@functools.lru_cache(maxsize=None)
def method_for(package: str = "mergekit"):
    """The `nearswap_chain` MergeMethod for `package` ("mergekit" or "mergekitty"),
    made once per package."""
    WeightInfo = importlib.import_module(f"{package}.architecture").WeightInfo
    common = importlib.import_module(f"{package}.common")
    ImmutableMap, ModelReference = common.ImmutableMap, common.ModelReference
    Task = importlib.import_module(TASK_MODULE[package]).Task
    base = importlib.import_module(f"{package}.merge_methods.base")
    ConfigParameterDef, MergeMethod = base.ConfigParameterDef, base.MergeMethod
    MergeTensorInput = base.MergeTensorInput

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

        def execute(self, tensors: Dict[Any, torch.Tensor], **_kwargs) -> torch.Tensor:
            return merge_in_order(
                tensors, self.base_model, self.secondaries, self.thresholds,
                self.round_stages, self.weight_name,
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
            parameters: ImmutableMap,
            tensor_parameters: ImmutableMap,
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

    NearSwapChainMerge.task_class = NearSwapChainTask
    return NearSwapChainMerge()


def merge_in_order(tensors: Dict[Any, torch.Tensor], base_model, secondaries: Tuple,
                   thresholds: Tuple[float, ...], round_stages: bool, weight_name: str) -> torch.Tensor:
    """One output tensor: the base, then each secondary that has this weight, in order."""
    if base_model not in tensors:
        raise RuntimeError(f"nearswap_chain: base model {base_model} has no tensor {weight_name}")
    # A weight missing from some secondaries is merged with those that have it.
    present = [(m, t) for m, t in zip(secondaries, thresholds) if m in tensors]
    base = tensors[base_model]
    if not present:
        return base
    buffer = _non_floating_buffer(base, [tensors[m] for m, _ in present], weight_name)
    if buffer is not None:
        return buffer
    shapes = {tuple(tensors[m].shape) for m, _ in present} | {tuple(base.shape)}
    if len(shapes) > 1:
        raise RuntimeError(f"Tensor size mismatch for {weight_name}, sizes: {sorted(shapes)}")
    warn_if_large([t for _, t in present], f" (tensor {weight_name})")
    return nearswap_chain(
        base, [tensors[m] for m, _ in present], [t for _, t in present], round_stages=round_stages
    )


def _threshold(value: Any, model, tensor: str) -> float:
    try:
        return parse_threshold(value)
    except ValueError as error:
        # This API hands over the resolved value, not where it was set.
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
    # This API hands booleans on as numbers (false -> 0.0).
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"round_stages must be true or false; got {value!r}")
