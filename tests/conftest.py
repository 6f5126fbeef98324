"""Shared fixtures: tiny stand-in checkpoints and a runner for the stock mergekit CLIs."""

import hashlib
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from reference import reference_chain, same_bits  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from nearswap_mergekit.tiny import QUARTET, build_family  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of `distribution`, or None where it is not installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


#: None in mergekitty's environment, which has no mergekit.
MERGEKIT_VERSION = installed_version("mergekit")
MERGEKITTY_VERSION = installed_version("mergekitty")


def mergekit_api() -> Optional[str]:
    """The merge-method API of the installed mergekit, by what it exposes rather than
    its version string (mergekit's GitHub main says 0.1.4 or anything else): "0.1.5"
    for the registry with `register` (MergeMethodSpec), "0.1.4" for
    REGISTERED_MERGE_METHODS; None without mergekit."""
    if MERGEKIT_VERSION is None:
        return None
    from mergekit.merge_methods import registry

    return "0.1.5" if hasattr(registry, "register") else "0.1.4"


MERGEKIT_API = mergekit_api()
ON_MERGEKIT_015 = MERGEKIT_API == "0.1.5"
only_mergekit_015 = pytest.mark.skipif(
    not ON_MERGEKIT_015,
    reason=f"mergekit 0.1.5's in-memory API (mergekit {MERGEKIT_VERSION} has {MERGEKIT_API}'s)",
)
#: For tests of code that does not touch mergekit (the kernels, the C build, the row
#: sample): the suite runs once per mergekit, and these need to run once.
mergekit_independent = pytest.mark.skipif(
    not ON_MERGEKIT_015, reason="does not use mergekit: run with the mergekit 0.1.5 suite"
)
#: For tests of mergekitty, mergekit's fork, in an environment that has it and no
#: mergekit (MERGEKIT_VERSION=mergekitty bash scripts/test.sh).
only_mergekitty = pytest.mark.skipif(
    MERGEKITTY_VERSION is None or MERGEKIT_VERSION is not None,
    reason="needs mergekitty without mergekit (MERGEKIT_VERSION=mergekitty bash scripts/test.sh); "
    f"here: mergekitty {MERGEKITTY_VERSION}, mergekit {MERGEKIT_VERSION}",
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    """Mark `mergekit` every test that runs mergekit (its CLIs or its API): all but
    those marked mergekit_independent or only_mergekitty, so a new test module counts
    as running mergekit until it says otherwise."""
    elsewhere = (mergekit_independent.mark, only_mergekitty.mark)
    for item in items:
        if not any(mark in elsewhere for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.mergekit)

#: For code run in a subprocess: registry access that works on mergekit 0.1.4 and 0.1.5.
REGISTRY_HELPERS = """
from mergekit import merge_methods
def names():
    if hasattr(merge_methods, "registered_methods"):
        return [m.spec.name for m in merge_methods.registered_methods()]
    return list(merge_methods.REGISTERED_MERGE_METHODS)
def pretty_name(name):
    method = merge_methods.get(name)
    return method.spec.pretty_name if hasattr(method, "spec") else method.pretty_name()
"""
CONFIGS = REPO / "configs"
BIN = Path(sys.executable).parent


def run_cli(*args, cwd, env=None, check=False):
    """Run a console script of this environment; offline, output captured."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    program = str(BIN / args[0]) if (BIN / args[0]).exists() else args[0]
    result = subprocess.run(
        [program, *map(str, args[1:])], cwd=cwd, env=full_env, capture_output=True, text=True
    )
    if check and result.returncode:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def file_digests(folder: Path):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class Workspace:
    """A folder holding tiny-quartet/ (the recipes' ./tiny-quartet/NAME paths)."""

    def __init__(self, root: Path):
        self.root = root
        self.models = root / "tiny-quartet"

    def model(self, name: str) -> str:
        return f"./tiny-quartet/{name}"

    def write_recipe(self, name: str, recipe) -> Path:
        path = self.root / name
        if isinstance(recipe, str):
            path.write_text(recipe)
        else:
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    def load(self, name: str):
        """The tensors of stand-in model `name` (or of an output folder under root),
        from all its safetensors files: mergekit writes model.safetensors, mergekitty
        model-00001-of-00001.safetensors beside an index."""
        folder = self.models / name if (self.models / name).is_dir() else self.root / name
        files = sorted(folder.glob("*.safetensors"))
        assert files, f"no safetensors files in {folder}"
        tensors = {}
        for file in files:
            tensors.update(load_file(str(file)))
        return tensors

    def reference(self, secondaries, t, base="miqu", round_stages=True):
        """The reference chain for every tensor; t is a number or t(tensor_name, model)."""
        t_for = t if callable(t) else (lambda _name, _model: t)
        models = [self.load(m) for m in secondaries]
        return {
            name: reference_chain(
                tensor, [m[name] for m in models], [t_for(name, m) for m in secondaries],
                round_stages,
            )
            for name, tensor in self.load(base).items()
        }

    def assert_merged(self, out: str, expected):
        """The merged output under root/out equals `expected` bit for bit; returns it."""
        merged = self.load(out)
        assert merged.keys() == expected.keys()
        wrong = [name for name in merged if not same_bits(merged[name], expected[name])]
        assert not wrong, f"differs from the reference: {wrong}"
        return merged

    def merge(self, recipe_name: str, out: str, *extra, check=True, env=None):
        return run_cli("mergekit-yaml", recipe_name, out, *extra, cwd=self.root, check=check, env=env)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("ws")
    build_family(root / "tiny-quartet", QUARTET)
    return Workspace(root)
