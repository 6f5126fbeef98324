"""The package as users get it: the built wheel in a new virtual environment, every
command run from an empty folder, stderr read."""

import os
import re
import subprocess
import sys
import sysconfig
from importlib.metadata import distribution
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO
from reference import same_bits
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _write_console_scripts(bin_dir: Path, python: Path, dist_name: str):
    """The console scripts pip would write for `dist_name` (installed in the test
    environment, reached from the new one through a path line)."""
    for entry in distribution(dist_name).entry_points:
        if entry.group == "console_scripts":
            script = bin_dir / entry.name
            script.write_text(
                f"#!{python}\nimport sys\nfrom {entry.module} import {entry.attr}\n"
                f"sys.exit({entry.attr}())\n"
            )
            script.chmod(0o755)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A new venv holding only the wheel; its dependencies (mergekit, torch, ...)
    come from the test environment on a path line, so nothing is downloaded."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(root / "dist"), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = (root / "dist").glob("nearswap_mergekit-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    Path(site, "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True,
    )
    _write_console_scripts(venv / "bin", python, "mergekit")
    empty = root / "empty"
    empty.mkdir()
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("NEARSWAP_MERGEKIT", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(
        HF_HUB_OFFLINE="1",
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        XDG_CACHE_HOME=str(root / "cache"),  # a new user's empty cache: the kernel is built
    )
    return {"site": Path(site), "bin": venv / "bin", "cwd": empty, "env": env}


def run(fresh, *command, cwd=None):
    result = subprocess.run(
        [str(fresh["bin"] / command[0]) if (fresh["bin"] / command[0]).exists() else command[0],
         *command[1:]],
        cwd=cwd or fresh["cwd"], env=fresh["env"], capture_output=True, text=True,
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def problems_from_this_package(stderr: str):
    """Lines of stderr that a user would read as trouble from this package."""
    lines = stderr.splitlines()
    if any(line.startswith("Traceback") for line in lines):
        return lines
    return [line for line in lines if re.search(r"nearswap|warn|error", line, re.IGNORECASE)
            and not _from_mergekit_or_transformers(line)]


def _from_mergekit_or_transformers(line: str) -> bool:
    # transformers 5 warns about mergekit's use of `torch_dtype`; not ours to fix.
    return "torch_dtype" in line


def test_installed_files(fresh):
    for name in ("nearswap_mergekit_hook.pth", "nearswap_mergekit_hook.start", "nearswap_mergekit_hook.py"):
        assert (fresh["site"] / name).is_file()
    recipes = sorted(p.name for p in (fresh["site"] / "nearswap_mergekit" / "recipes").iterdir())
    assert recipes == sorted(p.name for p in CONFIGS.glob("*.yml"))
    licences = {p.name for p in fresh["site"].glob("nearswap_mergekit-*.dist-info/licenses/*")}
    assert licences == {"LICENSE", "COPYING"}  # LGPL-3.0 and the GPL-3.0 it builds on


def test_import_is_silent_and_comes_from_the_wheel(fresh):
    result = run(fresh, "python", "-c", "import nearswap_mergekit as n; print(n.__file__)")
    assert result.stdout.startswith(str(fresh["site"])) and result.stderr == ""


def test_help_and_recipes(fresh):
    helped = run(fresh, "nearswap-mergekit", "--help")
    assert "recipe" in helped.stdout and helped.stderr == ""
    listed = run(fresh, "nearswap-mergekit", "recipe")
    assert listed.stderr == ""
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == sorted(p.stem for p in CONFIGS.glob("*.yml"))
    assert all(len(line.split(None, 1)) == 2 for line in listed.stdout.splitlines())
    quartet = run(fresh, "nearswap-mergekit", "recipe", "quartet")
    assert quartet.stdout == (CONFIGS / "quartet.yml").read_text() and quartet.stderr == ""
    written = run(fresh, "nearswap-mergekit", "recipe", "boreangale", "-o", "b.yml")
    assert (fresh["cwd"] / "b.yml").read_text() == (CONFIGS / "boreangale.yml").read_text()
    assert not problems_from_this_package(written.stderr)


def test_demo_and_a_merge_with_the_printed_recipe(fresh):
    demo = run(fresh, "nearswap-mergekit", "demo")
    assert not problems_from_this_package(demo.stderr), demo.stderr
    workdir = fresh["cwd"] / "demo"
    printed = run(fresh, "nearswap-mergekit", "recipe", "demo-quartet")
    (workdir / "printed.yml").write_text(printed.stdout)
    merge = run(fresh, "mergekit-yaml", "printed.yml", "merged-printed", cwd=workdir)
    assert not problems_from_this_package(merge.stderr), merge.stderr
    assert "NearSwap chain" in (workdir / "merged-printed" / "README.md").read_text()
    demo_out = load_file(str(workdir / "merged" / "model.safetensors"))
    printed_out = load_file(str(workdir / "merged-printed" / "model.safetensors"))
    assert demo_out.keys() == printed_out.keys()
    assert all(same_bits(demo_out[name], printed_out[name]) for name in demo_out)
    stats = run(fresh, "nearswap-mergekit", "stats", "printed.yml", "--quiet", cwd=workdir)
    assert "full swap" in stats.stdout and not problems_from_this_package(stats.stderr), stats.stderr
    (workdir / "notes.txt").write_text("NearSwap keeps the base where the models differ. " * 20)
    laddered = run(fresh, "nearswap-mergekit", "ladder", "printed.yml", "--text", "notes.txt",
                   "--t", "1e-3", "--context", "64", "--with-inputs", cwd=workdir)
    rows = [line.split()[0] for line in laddered.stdout.splitlines()[3:8]]
    assert rows == ["base", "t=0.001", "alone:", "alone:", "alone:"], laddered.stdout
    assert not problems_from_this_package(laddered.stderr), laddered.stderr
