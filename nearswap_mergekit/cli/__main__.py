"""`python -m nearswap_mergekit.cli`, as the `nearswap-mergekit` command."""

from nearswap_mergekit.cli import main

main()
