"""The facts that define `nearswap_chain`, each stated once: its names, its
reference, and what a valid threshold t is. Pure Python; imports nothing heavy.

Both mergekit adapters, the CLI, `stats` and the kernel read them from here.
"""

from __future__ import annotations

import math
import numbers

METHOD_NAME = "nearswap_chain"
PRETTY_NAME = "NearSwap chain"
REFERENCE_URL = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
#: Where a bad t may have been set, when mergekit does not say which.
T_SOURCE_UNKNOWN = "it comes from the global `parameters:` or from that model's own"


def check_threshold(t, what: str = "t") -> float:
    """Return t as a float, or raise ValueError unless it is a finite real number >= 0.

    Python and numpy numbers are accepted (numpy's float32 is no `float`);
    booleans and strings are not. -0.0 becomes +0.0.
    """
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise ValueError(f"{what} must be a number >= 0; got {t!r}")
    value = float(t)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0; got {t!r}")
    return value + 0.0


def parse_threshold(value, what: str = "NearSwap threshold t") -> float:
    """A threshold as written in a recipe or on a command line.

    YAML reads `1e-4` (no dot) as a string, so numeric strings are parsed.
    """
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{what} must be a number; got {value!r}") from None
    return check_threshold(value, what)
