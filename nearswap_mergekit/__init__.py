"""NearSwap for mergekit: the QuartetAnemoi merge as the `nearswap_chain` method.

Importing this package has no side effects and imports neither torch nor
mergekit: its names are loaded on first use (PEP 562), so the CLI's commands
that compute nothing start fast. The kernels (`nearswap`, `nearswap_chain`)
need only torch. The installed start-up hook registers `nearswap_chain`
whenever mergekit's merge methods are imported; where the hook does not run
(`python -S`, NEARSWAP_MERGEKIT_NO_HOOK=1), call `register()`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "check_threshold": "nearswap_mergekit.method.spec",
    "nearswap": "nearswap_mergekit.method.kernel",
    "nearswap_chain": "nearswap_mergekit.method.kernel",
    "register": "nearswap_mergekit.method.registration",
    "METHOD_NAME": "nearswap_mergekit.method.spec",
    "REFERENCE_URL": "nearswap_mergekit.method.spec",
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs; never run
    from nearswap_mergekit.method.kernel import nearswap, nearswap_chain
    from nearswap_mergekit.method.registration import register
    from nearswap_mergekit.method.spec import (
        METHOD_NAME,
        REFERENCE_URL,
        check_threshold,
    )


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        # Not ours: `from nearswap_mergekit import stats` then imports the submodule.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list:
    return sorted({*globals(), *_LAZY})
