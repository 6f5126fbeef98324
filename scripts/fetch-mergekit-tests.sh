#!/usr/bin/env bash
# Unpack the tests of the mergekit sdist that matches the mergekit installed in VENV
# into VENV/mergekit-tests-VERSION/ (tests/ and pyproject.toml, whose
# [tool.pytest.ini_options] the suite expects). tests/test_mergekit_upstream.py runs
# them. Does nothing when that folder is already there; uses only VENV's python and pip.
set -euo pipefail
venv=${1:?usage: fetch-mergekit-tests.sh VENV}
py=$venv/bin/python
version=$("$py" -c 'from importlib.metadata import version; print(version("mergekit"))')
dest=$venv/mergekit-tests-$version
[ -d "$dest" ] && exit 0

work=$(mktemp -d "$venv/.mergekit-tests.XXXXXX")
trap 'rm -rf "$work"' EXIT
# --no-binary: the wheel has no tests. pip reads the sdist's metadata (in a build
# environment of its own); nothing is installed here.
"$py" -m pip download -q --no-deps --no-binary mergekit "mergekit==$version" -d "$work/dl"
"$py" - "$work/dl/mergekit-$version.tar.gz" "mergekit-$version" "$work/out" <<'EOF'
import sys
import tarfile
from pathlib import Path, PurePosixPath

archive, top, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
wanted = 0
with tarfile.open(archive) as tar:
    for member in tar.getmembers():
        parts = PurePosixPath(member.name).parts
        if not member.isfile() or parts[0] != top or ".." in parts:
            continue
        relative = parts[1:]
        if relative == ("pyproject.toml",) or (len(relative) > 1 and relative[0] == "tests"):
            target = out.joinpath(*relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            wanted += 1
if not (out / "tests").is_dir() or not (out / "pyproject.toml").is_file():
    sys.exit(f"{archive}: no tests/ or pyproject.toml under {top}/")
print(f"unpacked {wanted} files of {Path(archive).name}")
EOF
# Renamed only once complete, so an interrupted run leaves nothing that looks done.
mv "$work/out" "$dest"
echo "mergekit $version tests: $dest"
