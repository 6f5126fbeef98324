#!/usr/bin/env bash
# Build the tiny stand-in quartet and merge it with the stock mergekit-yaml (offline).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
HF_HUB_OFFLINE=1 .venv/bin/nearswap-mergekit demo --workdir demo "$@"
