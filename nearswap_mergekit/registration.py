"""Registration of `nearswap_chain` with the installed mergekit (0.1.4 or 0.1.5).

Called by the start-up hook (through the `mergekit.merge_methods` entry point),
or by the user where the hook does not run (`python -S`). Idempotent; never
raises into mergekit.
"""

from __future__ import annotations

import logging

from nearswap_mergekit.spec import METHOD_NAME

log = logging.getLogger("nearswap_mergekit")

SUPPORTED_MERGEKIT = ("0.1.4", "0.1.5")


def mergekit_version() -> str:
    from importlib.metadata import version

    return version("mergekit")


def register() -> bool:
    """Register `nearswap_chain` with mergekit; True when ours is the registered one.

    Registering twice is a no-op. If mergekit already has a different method of
    that name, ours steps aside with a warning. With a mergekit version other than
    0.1.4 or 0.1.5 nothing is registered and a warning names the supported ones.
    Failures are logged, not raised.
    """
    try:
        installed = mergekit_version()
        release = installed.split("+")[0]
        if release not in SUPPORTED_MERGEKIT:
            log.warning(
                "nearswap-mergekit supports mergekit %s; this is mergekit %s, so the "
                "merge method %r is not registered (pip install 'mergekit==0.1.5')",
                " and ".join(SUPPORTED_MERGEKIT),
                installed,
                METHOD_NAME,
            )
            return False
        # mergekit.merge_methods first, on its own: with the start-up hook live,
        # importing it registers the plugins, this one included. Importing an
        # adapter first would import mergekit.merge_methods from inside the
        # half-initialised adapter, and the hook would find it half-made.
        import mergekit.merge_methods  # noqa: F401

        if release == "0.1.4":
            from nearswap_mergekit.adapter_014 import nearswap_chain_merge as ours
        else:
            from nearswap_mergekit.adapter_015 import nearswap_chain_merge as ours
        from nearswap_mergekit_hook import register_method  # shipped beside this package

        return register_method(ours)
    except Exception as error:
        log.warning(
            "nearswap-mergekit could not register %r with mergekit: %s: %s",
            METHOD_NAME,
            type(error).__name__,
            error,
        )
        return False
