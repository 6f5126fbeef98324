"""Registration of `nearswap_chain` with the installed mergekit or mergekitty.

The adapter is chosen by the merge-method API the package exposes, not by its
version: mergekit 0.1.5's (`registry.register`, `MergeMethodSpec`) or mergekit
0.1.4's (`REGISTERED_MERGE_METHODS`, `MergeMethod.make_task`), which mergekit's
GitHub main and mergekitty keep. The version appears only in messages.

Called by the start-up hook (through the entry-point groups
`mergekit.merge_methods` and `mergekitty.merge_methods`), or by the user where the
hook does not run (`python -S`). Idempotent; never raises into mergekit.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Optional

from nearswap_mergekit.method.spec import METHOD_NAME

log = logging.getLogger("nearswap_mergekit")

#: The packages `nearswap_chain` can be registered with.
PACKAGES = ("mergekit", "mergekitty")
#: Each API's adapter module.
ADAPTERS = {"0.1.5": "nearswap_mergekit.method.adapter_015", "0.1.4": "nearswap_mergekit.method.adapter_014"}
#: What to install where a package offers no API this package knows.
KNOWN_GOOD = "pip install 'mergekit==0.1.5'"


@dataclass(frozen=True)
class Target:
    """One package to register with, as found installed."""

    package: str  # "mergekit" or "mergekitty"
    version: str
    api: Optional[str]  # "0.1.5", "0.1.4", or None: neither

    @property
    def adapter(self) -> Optional[str]:
        return ADAPTERS.get(self.api)

    def describe(self) -> str:
        if self.api is None:
            return f"{self.package} {self.version} (no merge-method API this package knows)"
        return f"{self.package} {self.version} ({self.api}'s merge-method API, {self.adapter})"


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def inspect(package: str = "mergekit") -> Target:
    """Which version and merge-method API the installed `package` has (imports
    `package.merge_methods`)."""
    from importlib.metadata import version

    from nearswap_mergekit_hook import merge_method_api  # shipped beside this package

    return Target(package, version(package), merge_method_api(package))


def register(package: Optional[str] = None) -> bool:
    """Register `nearswap_chain` with `package`, or with each of mergekit and
    mergekitty that is installed; True when ours is the registered one in each.

    Registering twice is a no-op. If a package already has a different method of
    that name, ours steps aside with a warning. A package with neither merge-method
    API gets nothing, and a warning names what is missing. Failures are logged,
    not raised.
    """
    if package is not None:
        return _register_with(package)
    present = [name for name in PACKAGES if installed(name)]
    if not present:
        log.warning("nearswap-mergekit: neither mergekit nor mergekitty is installed (%s)", KNOWN_GOOD)
        return False
    return all([_register_with(name) for name in present])


def register_with_mergekit() -> bool:
    """Entry point of the group `mergekit.merge_methods`."""
    return _register_with("mergekit")


def register_with_mergekitty() -> bool:
    """Entry point of the group `mergekitty.merge_methods`."""
    return _register_with("mergekitty")


def _register_with(package: str) -> bool:
    try:
        # package.merge_methods first, on its own: with the start-up hook live,
        # importing it registers the plugins, this one included. Importing an
        # adapter first would import merge_methods from inside the half-initialised
        # adapter, and the hook would find it half-made.
        target = inspect(package)
        if target.api is None:
            log.warning(
                "nearswap-mergekit: %s %s has neither 0.1.5's merge-method registry "
                "(%s.merge_methods.registry.register) nor 0.1.4's "
                "(REGISTERED_MERGE_METHODS with MergeMethod.make_task), so the merge "
                "method %r is not registered (%s)",
                package, target.version, package, METHOD_NAME, KNOWN_GOOD,
            )
            return False
        if target.api == "0.1.5":
            if package != "mergekit":
                raise RuntimeError(f"the 0.1.5 adapter is written for mergekit, not {package}")
            from nearswap_mergekit.method.adapter_015 import (
                nearswap_chain_merge as ours,
            )
        else:
            from nearswap_mergekit.method.adapter_014 import method_for

            ours = method_for(package)
        from nearswap_mergekit_hook import register_method

        return register_method(ours, package)
    except Exception as error:
        log.warning(
            "nearswap-mergekit could not register %r with %s: %s: %s",
            METHOD_NAME,
            package,
            type(error).__name__,
            error,
        )
        return False
