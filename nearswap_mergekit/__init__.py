"""NearSwap for mergekit: the QuartetAnemoi merge as the `nearswap_chain` method.

Importing this package has no side effects and does not import mergekit: the
kernels (`nearswap`, `nearswap_chain`) need only torch. The installed start-up
hook registers `nearswap_chain` whenever mergekit's merge methods are imported;
where the hook does not run (`python -S`, NEARSWAP_MERGEKIT_NO_HOOK=1), call
`register()`.
"""

from nearswap_mergekit.kernel import check_threshold, nearswap, nearswap_chain
from nearswap_mergekit.registration import register
from nearswap_mergekit.spec import METHOD_NAME, REFERENCE_URL

__version__ = "0.1.0"
__all__ = ["METHOD_NAME", "REFERENCE_URL", "check_threshold", "nearswap", "nearswap_chain", "register"]
