"""The facts that define `nearswap_chain`, each stated once: its names, its
reference, what a valid threshold t is, and how a wanted swap fraction is
written. Pure Python; imports nothing heavy.

Both mergekit adapters, the CLI, `stats` and the kernel read them from here.
"""

from __future__ import annotations

import math
import numbers
import threading
from decimal import Decimal, InvalidOperation
from typing import Callable, Optional

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


#: A bare target at or above this is more likely a percentage written without `%`.
TARGET_SWAP_SUSPICIOUS = 0.5


def parse_target_swap(text, warn: Optional[Callable[[str], None]] = None) -> float:
    """A wanted fraction of weights fully swapped per pass, as written on a command
    line: a fraction in (0, 1) such as `0.008`, or a percentage such as `0.8%`.

    Raises ValueError outside (0, 1) (or (0%, 100%)). A bare value of 0.5 or more
    is accepted, but `warn` (when given) is called with one line saying that it
    reads as a fraction and how to write a percentage.
    """
    written = str(text).strip()
    percent = written.endswith("%")
    number = written[:-1].strip() if percent else written
    try:
        # Decimal keeps `0.7%` exactly 0.007 (0.7 / 100 is 0.006999... in floats).
        value = Decimal(number)
    except InvalidOperation:
        value = Decimal("NaN")
    scale = 100 if percent else 1
    if not (value.is_finite() and 0 < value < scale):
        raise ValueError(
            "must be a fraction in (0, 1) such as 0.008, or a percentage in (0%, 100%) "
            f"such as 0.8%; got {written!r}"
        )
    fraction = float(value / scale)
    if not percent and fraction >= TARGET_SWAP_SUSPICIOUS and warn is not None:
        warn(
            f"{written} reads as a fraction ({written} = {100 * fraction:g} % of the weights "
            f"fully swapped per pass); for {written} percent write {written}%"
        )
    return fraction


#: The QuartetAnemoi card saw ~18 % of weights fully swapped per pass and garbage
#: output from its 70B models at about this t (0.8 % and good output at 0.0001).
CARD_GARBAGE_T = 0.0025
_large_t_warned = threading.Lock()


def warn_if_large(thresholds, where: str = "") -> None:
    """Log, once per process, that a merge uses t >= CARD_GARBAGE_T. Called by the
    adapters as they merge (`stats`, `calibrate` and `ladder` report t themselves
    and never go through them)."""
    largest = max(thresholds, default=0.0)
    if largest < CARD_GARBAGE_T or not _large_t_warned.acquire(blocking=False):
        return  # small t, or warned already (the lock is never released)
    import logging

    logging.getLogger("nearswap_mergekit").warning(
        "%s: t = %g%s is >= %g, where the QuartetAnemoi card saw about 18 %% of weights "
        "fully swapped per pass and garbage output from its 70B models; check the merge "
        "with `nearswap-mergekit stats` or `ladder` before using it",
        METHOD_NAME, largest, where, CARD_GARBAGE_T,
    )
