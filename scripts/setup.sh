# Sourced by demo.sh and test.sh: make a virtual environment with the CPU build of
# torch, mergekit and this package (editable, with its test extras). Re-running it
# is cheap. MERGEKIT_VERSION picks the mergekit and the environment:
#   0.1.5       mergekit 0.1.5 from PyPI                             ./.venv
#   0.1.4       mergekit 0.1.4 from PyPI                             ./.venv-mergekit-0.1.4
#   main        mergekit's GitHub main (the snapshot in tests/upstream/), its version
#               changed to 0.1.6.dev0 so nothing can lean on "0.1.4"   ./.venv-mergekit-main
#   mergekitty  mergekitty, the LGPL fork, and no mergekit at all    ./.venv-mergekitty
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
MERGEKIT_VERSION=${MERGEKIT_VERSION:-0.1.5}
MERGEKIT_MAIN=tests/upstream/mergekit-main-a6e4028.tar.gz
MERGEKIT_MAIN_VERSION=0.1.6.dev0
MERGEKITTY=mergekitty==0.3.1.post2
sources=(pyproject.toml scripts/setup.sh nearswap_mergekit_hook.*)
# EXTRAS: this package's extras. Only the 0.1.5 environment has `gpu` (Triton, whose
# interpreter runs tests/test_triton.py on the CPU): the tests that use no mergekit
# run in that suite alone. It alone has `eval` too (lm-eval, for `ladder --task`):
# the other suites stay lean, and those tests skip where lm-eval is not installed.
case "$MERGEKIT_VERSION" in
    0.1.5) VENV=.venv; EXTRA=(); EXTRAS=test,plot,gpu,eval ;;
    # mergekit 0.1.4 needs transformers 4.x
    0.1.4) VENV=.venv-mergekit-0.1.4; EXTRA=("transformers<5"); EXTRAS=test,plot ;;
    main) VENV=.venv-mergekit-main; sources+=("$MERGEKIT_MAIN") ;;
    mergekitty) VENV=.venv-mergekitty ;;
    *) echo "MERGEKIT_VERSION must be 0.1.4, 0.1.5, main or mergekitty" >&2; exit 2 ;;
esac

# The requirements that installed distribution $1 declares, one a line: its own and
# those of the extras named in $2 (comma-separated), less the projects named after.
requirements_of() {
    "$VENV/bin/python" - "$@" <<'EOF'
import re
import sys
from importlib.metadata import requires

dist, extras, *left_out = sys.argv[1:]
extras = set(filter(None, extras.split(",")))
for line in requires(dist) or []:
    requirement, _, marker = (part.strip() for part in line.partition(";"))
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group().lower().replace("_", "-")
    extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
    if name in left_out or (extra and extra.group(1) not in extras):
        continue
    print(requirement if extra else line)
EOF
}

# This package without its declared mergekit (--no-deps), then its other
# requirements and test extras, along with any given here, in one resolve.
install_package_without_mergekit() {
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    local requirements
    mapfile -t requirements < <(requirements_of nearswap-mergekit test,plot mergekit)
    "$VENV/bin/python" -m pip install -q "${requirements[@]}" "$@"
}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp=$VENV/.nearswap-setup
# The hook files are copied into site-packages even by an editable install.
want=$(cat "${sources[@]}" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch first, pinned: this version is the local CPU build; an unpinned torch
    # requirement would pull a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q hatchling
    case "$MERGEKIT_VERSION" in
        0.1.4 | 0.1.5)
            # torch is already here, pinned: lm-eval's own torch requirement is met by it.
            "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]" "mergekit==$MERGEKIT_VERSION" "${EXTRA[@]}"
            ;;
        main)
            # mergekit's README installs main from a checkout; the snapshot still says
            # 0.1.4. Installed as 0.1.6.dev0, the suite shows that the method is found
            # by the API mergekit has, not by its version string. Its own tests
            # (tests/ and pyproject.toml) go where scripts/fetch-mergekit-tests.sh
            # would put an sdist's, for tests/test_mergekit_upstream.py.
            work=$(mktemp -d "$VENV/.mergekit-main.XXXXXX")
            tar -xzf "$MERGEKIT_MAIN" -C "$work"
            source_dir=("$work"/mergekit-main-*)
            sed -i "s/^version = \"0\.1\.4\"$/version = \"$MERGEKIT_MAIN_VERSION\"/" "$source_dir/pyproject.toml"
            grep -q "^version = \"$MERGEKIT_MAIN_VERSION\"$" "$source_dir/pyproject.toml" \
                || { echo "$MERGEKIT_MAIN: no version = \"0.1.4\" line to change" >&2; exit 1; }
            # Its own pins choose transformers (>= 5; pip settles on 5.12.1).
            "$VENV/bin/python" -m pip install -q "$source_dir"
            # --no-deps: the snapshot stays whatever mergekit range this package
            # declares (an upper bound such as <0.1.6 leaves out 0.1.6.dev0, a
            # pre-release of 0.1.6, and pip would swap in PyPI's 0.1.5 unasked).
            # With mergekit>=0.1.4 declared, `pip check` finds nothing broken.
            install_package_without_mergekit
            tests_dir=$VENV/mergekit-tests-$MERGEKIT_MAIN_VERSION
            mkdir "$work/tests-out"
            mv "$source_dir/tests" "$source_dir/pyproject.toml" "$work/tests-out/"
            rm -rf "$tests_dir"
            mv "$work/tests-out" "$tests_dir"
            rm -rf "$work"
            ;;
        mergekitty)
            # --no-deps: mergekitty pins torch~=2.10.0, whose only build on offer here
            # is CUDA's (915 MB); the CPU torch 2.13.0 above runs it. Its other
            # requirements come from its own metadata, with transformers 5.3.0:
            # mergekitty's own `nearswap` fails on transformers >= 5.4. This package
            # goes in without its declared mergekit (mergekit must not be here: the
            # environment is mergekitty's alone). So pip, as it installs, and `pip
            # check` report exactly these two, both expected: "mergekitty ...
            # requires torch~=2.10.0, but you have torch 2.13.0+cpu" and
            # "nearswap-mergekit ... requires mergekit..., which is not installed".
            "$VENV/bin/python" -m pip install -q --no-deps "$MERGEKITTY"
            mapfile -t kitty_requirements < <(requirements_of mergekitty "" torch)
            install_package_without_mergekit "${kitty_requirements[@]}" transformers==5.3.0
            if "$VENV/bin/python" -c 'import mergekit' 2> /dev/null; then
                echo "$VENV: mergekit is installed; the mergekitty environment must not have it" >&2
                exit 1
            fi
            ;;
    esac
    echo "$want" > "$stamp"
fi
