"""NearSwap for mergekit: the QuartetAnemoi merge as the `nearswap_chain` method.

Importing this package registers `nearswap_chain` with mergekit (the installed
start-up hook normally does so already, whenever mergekit is imported).
"""

from nearswap_mergekit.kernel import check_threshold, nearswap, nearswap_chain
from nearswap_mergekit.registration import METHOD_NAME, register

__version__ = "0.1.0"
__all__ = ["METHOD_NAME", "check_threshold", "nearswap", "nearswap_chain", "register"]

register()
