"""The code runs on the oldest Python that pyproject.toml admits (checked with vermin,
since that Python is not installed here)."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, mergekit_independent

pytestmark = mergekit_independent

SOURCES = ["nearswap_mergekit", "nearswap_mergekit_hook.py", "tests", "benchmarks"]


def test_no_call_newer_than_requires_python():
    pyproject = (REPO / "pyproject.toml").read_text()
    oldest = re.search(r'requires-python = ">=(3\.\d+)"', pyproject).group(1)
    vermin = Path(sys.executable).parent / "vermin"
    result = subprocess.run(
        [str(vermin), f"-t={oldest}-", "--violations", "--no-tips", "--eval-annotations",
         *SOURCES], cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_script_shadows_a_standard_module():
    """A script's folder comes first on sys.path: benchmarks/profile.py once hid the
    standard `profile` module from everything the quality study imports."""
    scripts = [p for folder in ("benchmarks", "tests", "scripts") for p in (REPO / folder).glob("*.py")]
    assert scripts
    shadowing = sorted(p.name for p in scripts if p.stem in sys.stdlib_module_names)
    assert not shadowing, f"rename these: they shadow standard modules: {shadowing}"
