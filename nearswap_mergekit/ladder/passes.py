"""How many times the streamed ladder reads its inputs: the windows split into the
fewest passes whose hidden states fit the memory budget (each pass reads every
input weight once). Spilling hidden states to disk would cost more I/O than one
more read of the inputs: for a 70B, 10^6 tokens and 7 rows, about 37 TB across
the layer boundaries against 552 GB per extra pass.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from nearswap_mergekit.ladder import scoring
from nearswap_mergekit.ladder.rungs import LadderError

#: The default budget: this share of the memory available when the ladder starts
#: (MemAvailable; on CUDA, the device's free memory).
DEFAULT_SHARE = 0.5




def machine_memory() -> tuple:
    """(total, available) bytes of this machine's memory, from /proc/meminfo."""
    found = {}
    with open("/proc/meminfo", encoding="ascii") as info:
        for line in info:
            key, value = line.split(":", 1)
            found[key] = int(value.split()[0]) * 1024
    return found["MemTotal"], found.get("MemAvailable", found["MemFree"])


def device_memory(device: torch.device) -> tuple:
    """(total, available) bytes where the hidden states wait: RAM, or the GPU's memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    return machine_memory()


def hidden_bytes(window: scoring.Window, rows: int, hidden_size: int, dtype: torch.dtype) -> int:
    """The hidden states of one window for every row, between two layers."""
    return rows * len(window.ids) * hidden_size * dtype.itemsize


def choose_budget(asked: Optional[int], device: torch.device) -> int:
    """The budget for the hidden states: the one asked for (not above the memory
    there is), else DEFAULT_SHARE of the memory available now."""
    total, available = device_memory(device)
    if asked is None:
        return int(DEFAULT_SHARE * available)
    if asked > total:
        where = "this GPU" if device.type == "cuda" else "this machine"
        raise LadderError(f"--memory-budget {asked:,} bytes is more than {where}'s {total:,} bytes of "
                          f"memory: give {int(DEFAULT_SHARE * available):,} or less (half of what is "
                          "available now), or leave it out")
    return asked


def plan_passes(windows: Sequence[scoring.Window], batch: Optional[int], rows: int, hidden_size: int,
                dtype: torch.dtype, budget: int) -> List[List[scoring.Window]]:
    """The windows in the fewest passes whose hidden states fit `budget`, each pass
    whole batches (groups of at most `batch` windows of one length, as
    scoring.batches makes them, so one pass gives today's batches)."""
    groups = scoring.batches(windows, batch)
    sizes = [sum(hidden_bytes(w, rows, hidden_size, dtype) for w in group) for group in groups]
    smallest = max(sizes, default=0)
    if smallest > budget:
        raise LadderError(f"--memory-budget {budget:,} bytes is less than one batch's hidden states for "
                          f"every row ({smallest:,} bytes): give --memory-budget {smallest:,} or more, "
                          "or a smaller --batch")
    passes: List[List[scoring.Window]] = [[]]
    held = 0
    for group, size in zip(groups, sizes):
        if held + size > budget and passes[-1]:
            passes.append([])
            held = 0
        passes[-1] += group
        held += size
    return passes
