"""Registration of `nearswap_chain` with the installed mergekit.

Called by the start-up hook (through the `mergekit.merge_methods` entry point)
and by `import nearswap_mergekit`. Idempotent; never raises into mergekit.
"""

from __future__ import annotations

import logging

log = logging.getLogger("nearswap_mergekit")

METHOD_NAME = "nearswap_chain"


def register() -> bool:
    """Register `nearswap_chain` with mergekit; True when ours is the registered one.

    Registering twice is a no-op. If mergekit already has a different method of
    that name, ours steps aside with a warning. Failures are logged, not raised.
    """
    try:
        from mergekit.merge_methods import registry

        from nearswap_mergekit.mergekit_method import nearswap_chain_merge

        present = {m.spec.name: m for m in registry.registered_methods()}
        existing = present.get(METHOD_NAME)
        if existing is None:
            registry.register(nearswap_chain_merge)
            return True
        if existing is nearswap_chain_merge:
            return True
        log.warning(
            "mergekit already provides a merge method named %r (%s); "
            "nearswap-mergekit's is not registered and steps aside",
            METHOD_NAME,
            type(existing).__module__,
        )
        return False
    except Exception as error:
        log.warning(
            "nearswap-mergekit could not register %r with mergekit: %s: %s",
            METHOD_NAME,
            type(error).__name__,
            error,
        )
        return False
