"""The start-up hook and explicit registration, each in a fresh interpreter."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REGISTRY_HELPERS, REPO

SITE_PACKAGES = sysconfig.get_paths()["purelib"]
HOOK_PTH = REPO / "nearswap_mergekit_hook.pth"


def python(code, *flags, env=None, cwd=None, helpers=True):
    """Run code in a fresh interpreter (with REGISTRY_HELPERS unless helpers=False)."""
    full_env = {k: v for k, v in os.environ.items() if k != "NEARSWAP_MERGEKIT_NO_HOOK"}
    full_env.update(env or {})
    code = textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, *flags, "-c", (REGISTRY_HELPERS if helpers else "") + code],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or "/",
    )


def test_pth_is_one_ascii_line():
    text = HOOK_PTH.read_bytes()
    assert text.isascii() and text.count(b"\n") == 1 and text.startswith(b"import ")
    assert (REPO / "nearswap_mergekit_hook.start").read_text().strip() == (
        "nearswap_mergekit_hook:install"
    )


def test_start_up_imports_no_torch_or_mergekit():
    result = python(
        """
        import sys
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "mergekit", "nearswap_mergekit")]
        print(heavy, "nearswap_mergekit_hook" in sys.modules)
        """,
        helpers=False,
    )
    assert result.stdout.split() == ["[]", "True"], result.stderr


def test_stock_mergekit_finds_the_method_without_importing_the_package():
    result = python(
        """
        import sys
        print(pretty_name("nearswap_chain"), "nearswap_mergekit" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "NearSwap chain True"  # imported by the hook, not by us
    assert result.stderr == ""


def test_environment_variable_switches_the_hook_off():
    code = """
        try:
            merge_methods.get("nearswap_chain")
        except RuntimeError as error:
            print("absent:", error)
        import nearswap_mergekit
        print("import alone:", "nearswap_chain" in names())
        print("explicit:", nearswap_mergekit.register(), "nearswap_chain" in names())
        """
    result = python(code, env={"NEARSWAP_MERGEKIT_NO_HOOK": "1"})
    assert "absent: Unimplemented merge method nearswap_chain" in result.stdout, result.stderr
    assert "import alone: False" in result.stdout
    assert "explicit: True True" in result.stdout
    assert result.stderr == ""


def test_python_dash_S_registers_with_register_quietly():
    code = f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {SITE_PACKAGES!r}]
        {REGISTRY_HELPERS.strip().replace(chr(10), chr(10) + " " * 8)}
        print("before:", "nearswap_chain" in names())
        import nearswap_mergekit
        print("after import:", "nearswap_chain" in names())
        print("register:", nearswap_mergekit.register(), "nearswap_chain" in names())
        print("register again:", nearswap_mergekit.register(), names().count("nearswap_chain"))
        """
    result = python(code, "-S", helpers=False)
    assert result.stdout.split("\n")[:4] == [
        "before: False",
        "after import: False",
        "register: True True",
        "register again: True 1",
    ], result.stderr
    assert result.stderr == ""


def test_import_has_no_side_effects_and_the_kernel_needs_no_mergekit():
    """`import nearswap_mergekit` imports neither mergekit nor transformers and prints
    nothing; with mergekit made unimportable, the kernels still work."""
    quiet = python(
        """
        import sys
        import nearswap_mergekit
        print(sorted({m.split(".")[0] for m in sys.modules} & {"mergekit", "transformers"}))
        """,
        helpers=False,
    )
    assert quiet.stdout == "[]\n" and quiet.stderr == "", quiet.stderr
    without_mergekit = python(
        """
        import sys
        class NoMergekit:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("mergekit", "transformers"):
                    raise ImportError(f"{name} hidden by the test")
        sys.meta_path.insert(0, NoMergekit())
        import torch
        from nearswap_mergekit import nearswap, nearswap_chain
        a, b = torch.zeros(3), torch.tensor([1e-5, 1.0, -1.0])
        print(torch.equal(nearswap(a, b, 1e-4), torch.tensor([1e-5, 1e-4, -1e-4])))
        print(nearswap_chain(a, [b, b], 1e-4).shape)
        """,
        env={"NEARSWAP_MERGEKIT_NO_HOOK": "1"},
        helpers=False,
    )
    assert without_mergekit.stdout.split("\n")[:2] == ["True", "torch.Size([3])"], without_mergekit.stderr


def test_explicit_register_with_the_hook_live_is_quiet():
    """register() imports mergekit.merge_methods (firing the hook, which registers
    the method) before the adapter: no half-initialised import, no message."""
    result = python(
        """
        import nearswap_mergekit
        print(nearswap_mergekit.register(), names().count("nearswap_chain"))
        """
    )
    assert result.stdout.strip() == "True 1" and result.stderr == "", result.stderr


def test_a_find_spec_probe_does_not_spend_the_hook():
    probe = (
        "import importlib.util\n"
        "print(importlib.util.find_spec('mergekit.merge_methods') is not None)\n"
        "print(importlib.util.find_spec('mergekit.merge_methods') is not None)\n"
    )
    # REGISTRY_HELPERS then imports mergekit.merge_methods for real.
    result = python(probe + REGISTRY_HELPERS + "print(pretty_name('nearswap_chain'))\n", helpers=False)
    assert result.stdout.split("\n")[:3] == ["True", "True", "NearSwap chain"], result.stderr


def test_pth_line_is_idempotent_and_harmless_without_its_module():
    line = HOOK_PTH.read_text()
    twice = python(
        f"""
        import sys
        exec({line!r}); exec({line!r})
        print(sum(getattr(f, "_mergekit_plugin_hook", False) for f in sys.meta_path))
        print(names().count("nearswap_chain"))
        """
    )
    assert twice.stdout.split() == ["1", "1"], twice.stderr
    # As if the package were uninstalled and the .pth left behind: nothing happens.
    orphan = python(f"exec({line!r}); print('ok')", "-S", helpers=False)
    assert orphan.stdout.strip() == "ok" and orphan.stderr == ""


def test_a_broken_plugin_is_logged_once_and_skipped(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('simulated failure')\n")
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[mergekit.merge_methods]\nbroken = broken_plugin:method\n"
    )
    result = python(
        """
        print(pretty_name("linear"), pretty_name("nearswap_chain"))
        """,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.stdout.strip() == "Linear NearSwap chain", result.stderr
    assert result.stderr.count("simulated failure") == 1
    assert "'broken'" in result.stderr


def test_steps_aside_when_mergekit_already_has_a_nearswap_chain():
    result = python(
        """
        from mergekit.merge_methods import registry
        if hasattr(registry, "register"):  # mergekit 0.1.5
            import torch
            from mergekit.merge_methods import merge_method, TensorGroup
            @merge_method(name="nearswap_chain", pretty_name="mergekit's own")
            def theirs(group: TensorGroup) -> torch.Tensor:
                return group.entries[0].tensor
            registry.register(theirs)
        else:  # mergekit 0.1.4
            from mergekit.merge_methods.linear import LinearMerge
            class Theirs(LinearMerge):
                def pretty_name(self):
                    return "mergekit's own"
            registry.REGISTERED_MERGE_METHODS["nearswap_chain"] = Theirs()
        import nearswap_mergekit
        print(pretty_name("nearswap_chain"), nearswap_mergekit.register())
        """,
        env={"NEARSWAP_MERGEKIT_NO_HOOK": "1"},
    )
    assert result.stdout.strip() == "mergekit's own False", result.stderr
    assert "steps aside" in result.stderr and "Traceback" not in result.stderr


def test_a_version_never_seen_registers_by_its_api():
    """The adapter follows the API mergekit exposes; the version string is only
    shown in messages (CI also runs the suite on mergekit's main re-versioned)."""
    patch = """
import importlib.metadata as metadata
real = metadata.version
metadata.version = lambda name: "0.1.6.dev0" if name == "mergekit" else real(name)
"""
    result = python(
        patch + REGISTRY_HELPERS + textwrap.dedent(
            """
            from nearswap_mergekit.method.registration import inspect
            print(pretty_name("nearswap_chain"), "|", inspect().describe())
            """
        ),
        helpers=False,
    )
    assert result.returncode == 0, result.stderr
    name, described = result.stdout.strip().split(" | ")
    assert name == "NearSwap chain"
    assert described.startswith("mergekit 0.1.6.dev0 (0.1.") and "merge-method API" in described
    assert result.stderr == ""


def test_a_mergekit_with_neither_api_gets_no_method_and_a_message():
    result = python(
        """
        from mergekit.merge_methods import registry
        for name in ("register", "REGISTERED_MERGE_METHODS"):
            if hasattr(registry, name):
                delattr(registry, name)
        import nearswap_mergekit
        print("registered:", nearswap_mergekit.register("mergekit"))
        """,
        env={"NEARSWAP_MERGEKIT_NO_HOOK": "1"},
        helpers=False,
    )
    assert result.stdout.strip() == "registered: False", result.stderr
    assert "has neither 0.1.5's merge-method registry (mergekit.merge_methods.registry.register)" in result.stderr
    assert "nor 0.1.4's (REGISTERED_MERGE_METHODS" in result.stderr
    assert "pip install 'mergekit==0.1.5'" in result.stderr and "Traceback" not in result.stderr


PLUGIN_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tiny-mergekit-plugin"
version = "0.1"

[project.entry-points."mergekit.merge_methods"]
elementwise_max = "tiny_mergekit_plugin:register"
"""

PLUGIN_MODULE = '''
"""A one-function mergekit merge method: the elementwise maximum of the inputs
(order-free, since mergekit 0.1.4's easy_define hands inputs over unordered)."""

def register():
    from mergekit.merge_methods import registry
    import torch
    if hasattr(registry, "register"):  # mergekit 0.1.5
        from mergekit.merge_methods import TensorGroup, merge_method

        @merge_method(name="elementwise_max", pretty_name="Elementwise max")
        def elementwise_max(group: TensorGroup) -> torch.Tensor:
            return torch.stack(group.tensors).amax(0)

        registry.register(elementwise_max)
    else:  # mergekit 0.1.4
        from typing import List
        from mergekit.merge_methods.easy_define import merge_method

        @merge_method(name="elementwise_max", pretty_name="Elementwise max")
        def elementwise_max(tensors: List[torch.Tensor]) -> torch.Tensor:
            return torch.stack(tensors).amax(0)
'''


@pytest.mark.slow
def test_another_package_publishes_a_method_through_the_entry_point_group(tmp_path, workspace):
    """A second tiny package, built and installed here, adds `elementwise_max` to the stock CLI."""
    source = tmp_path / "plugin"
    (source / "tiny_mergekit_plugin").mkdir(parents=True)
    (source / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (source / "tiny_mergekit_plugin" / "__init__.py").write_text(PLUGIN_MODULE)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    workspace.write_recipe(
        "elementwise-max.yml",
        "merge_method: elementwise_max\nmodels:\n"
        f"  - model: {workspace.model('miqu')}\n  - model: {workspace.model('xwin')}\n",
    )
    merged = subprocess.run(
        [str(Path(sys.executable).parent / "mergekit-yaml"), "elementwise-max.yml", str(tmp_path / "out")],
        cwd=workspace.root, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"},
    )
    assert merged.returncode == 0, merged.stderr[-2000:]
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    miqu, xwin = (load_file(str(workspace.models / m / "model.safetensors")) for m in ("miqu", "xwin"))
    assert all(out[name].equal(torch.maximum(miqu[name], xwin[name])) for name in xwin)
    assert "Elementwise max" in (tmp_path / "out" / "README.md").read_text()


PLUGIN_STYLES = {
    # `from ... import` style: works even while mergekit.merge_methods is importing.
    "from_import": "from mergekit.merge_methods import registry",
    # These need mergekit.merge_methods bound on mergekit when plugins run
    # (Python binds a submodule on its parent only once its import returns).
    "module_alias": "import mergekit.merge_methods as mm\n    registry = mm.registry",
    "attribute": "import mergekit\n    registry = mergekit.merge_methods.registry",
}
PLUGIN_SOURCE = """
def register():
    {import_line}
    if hasattr(registry, "register"):  # mergekit 0.1.5
        import torch
        from mergekit.merge_methods import TensorGroup, merge_method

        @merge_method(name={name!r})
        def first(group: TensorGroup) -> torch.Tensor:
            return group.entries[0].tensor

        registry.register(first)
    else:  # mergekit 0.1.4
        from mergekit.merge_methods.linear import LinearMerge

        registry.REGISTERED_MERGE_METHODS[{name!r}] = LinearMerge()
"""


def _plugin_dist(folder: Path, module: str, source: str) -> None:
    (folder / f"{module}.py").write_text(source)
    dist = folder / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[mergekit.merge_methods]\n{module} = {module}:register\n")


def test_plugins_may_use_either_import_style(tmp_path):
    for style, import_line in PLUGIN_STYLES.items():
        name = f"plugin_{style}"
        _plugin_dist(tmp_path, name, PLUGIN_SOURCE.format(import_line=import_line, name=name))
    result = python(
        """
        print(sorted(n for n in names() if n.startswith("plugin_") or n == "nearswap_chain"))
        """,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.stdout.strip() == str(
        ["nearswap_chain", "plugin_attribute", "plugin_from_import", "plugin_module_alias"]
    ), result.stderr
    assert result.stderr == ""
