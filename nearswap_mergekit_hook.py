"""Start-up hook that lets installed packages add merge methods to mergekit.

mergekit has no plugin entry points, so this module (run from a .pth or PEP 829
.start file) puts one cheap finder on sys.meta_path. It ignores every import
except the packages ``mergekit.merge_methods`` and ``mergekitty.merge_methods``
(mergekit's fork, same API under another name); right after one of them (and
with it the registry) has first been imported, it registers every method that an
installed package declares under the entry-point group of the same name
(``mergekit.merge_methods`` or ``mergekitty.merge_methods``). Waiting for the whole
package, not just its registry module, lets plugins use any of mergekit's
merge-method helpers. An entry point's object is either a ``MergeMethod``
(registered under its name) or a callable taking no arguments that registers its
methods itself.

Nothing is imported at start-up beyond this file. A failing plugin is logged and
skipped; mergekit and the other plugins keep working. Set
NEARSWAP_MERGEKIT_NO_HOOK=1 to switch the hook off.
"""

import os
import sys

ENTRY_POINT_GROUP = "mergekit.merge_methods"
#: The packages watched; each one's plugins are declared under an entry-point
#: group of the same name.
TARGETS = (ENTRY_POINT_GROUP, "mergekitty.merge_methods")
DISABLE_VARIABLE = "NEARSWAP_MERGEKIT_NO_HOOK"
_MARK = "_mergekit_plugin_hook"


def install():
    """Arm the hook (idempotent); the .pth and .start files call this at start-up."""
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return
    if any(getattr(finder, _MARK, False) for finder in sys.meta_path):
        return
    finder = _MergeMethodsFinder()
    for target in TARGETS:
        if target in sys.modules:  # installed late: that package is already there
            finder.fired.add(target)
            load_plugins(target)
    sys.meta_path.insert(0, finder)


class _MergeMethodsFinder:
    """A plain meta-path finder (importlib.abc would cost an import at start-up).

    Finding a spec changes nothing: a probe such as importlib.util.find_spec
    gets a wrapped spec too, and only the import that executes the package
    spends the hook.
    """

    _mergekit_plugin_hook = True

    def __init__(self):
        self.fired = set()  # the packages whose plugins are loaded

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGETS or fullname in self.fired:
            return None
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                if finder is self or find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _LoadPluginsAfter(spec.loader, self)
            return spec
        except Exception as error:  # leave the import to Python's own finders
            import warnings

            warnings.warn(f"mergekit plugin hook disabled: {type(error).__name__}: {error}")
            return None


class _LoadPluginsAfter:
    """Wraps the package's loader: run it, then register the plugins."""

    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)  # if it raises, the hook stays armed
        if module.__name__ in self._finder.fired:
            return
        self._finder.fired.add(module.__name__)
        # Python binds the submodule on its parent only after this returns; bind
        # it now, so `import mergekit.merge_methods as mm` works inside plugins.
        parent, _, child = module.__name__.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)
        load_plugins(module.__name__)


def load_plugins(group=ENTRY_POINT_GROUP):
    """Register every method declared under `group` (one of TARGETS, the package
    it registers with); never raises."""
    import logging

    log = logging.getLogger(group.split(".")[0] + ".plugins")
    try:
        from importlib.metadata import entry_points

        declared = entry_points(group=group)
    except Exception as error:  # a broken distribution must not break mergekit
        log.warning("mergekit plugins: cannot list entry points: %s", error)
        return
    seen = set()
    for entry_point in declared:
        if entry_point.value in seen:  # the same distribution seen on two paths
            continue
        seen.add(entry_point.value)
        try:
            register_object(entry_point.load(), group.split(".")[0])
        except Exception as error:
            log.warning(
                "mergekit plugin %r (%s) was skipped: %s: %s",
                entry_point.name,
                entry_point.value,
                type(error).__name__,
                error,
            )


def register_object(obj, package="mergekit"):
    """Register a MergeMethod with `package`, or call a registration function."""
    if not hasattr(obj, "spec") and not hasattr(obj, "make_task") and callable(obj):
        obj()
    else:
        register_method(obj, package)


def merge_method_api(package="mergekit"):
    """Which merge-method API `package` ("mergekit" or "mergekitty") has: "0.1.5"
    (``registry.register``, ``MergeMethodSpec``), "0.1.4" (the dict
    ``REGISTERED_MERGE_METHODS`` and ``MergeMethod.make_task``), or None. Imports
    ``package.merge_methods``."""
    import importlib

    registry = importlib.import_module(package + ".merge_methods.registry")
    if callable(getattr(registry, "register", None)) and hasattr(registry, "registered_methods"):
        return "0.1.5"
    base = importlib.import_module(package + ".merge_methods.base")
    if isinstance(getattr(registry, "REGISTERED_MERGE_METHODS", None), dict) and hasattr(
        getattr(base, "MergeMethod", None), "make_task"
    ):
        return "0.1.4"
    return None


def register_method(method, package="mergekit") -> bool:
    """Register a MergeMethod with `package`'s registry (mergekit 0.1.5's
    ``registry.register``, or the dict of mergekit 0.1.4, mergekit's main and mergekitty).

    True when `method` is the registered one (now or already); False, with a
    warning, when that package already has a different method of that name.
    """
    import importlib

    registry = importlib.import_module(package + ".merge_methods.registry")
    api = merge_method_api(package)
    if api == "0.1.5":
        name = method.spec.name
        present = {m.spec.name: m for m in registry.registered_methods()}
    elif api == "0.1.4":
        name = method.name()
        present = registry.REGISTERED_MERGE_METHODS
    else:
        raise RuntimeError(package + " has neither merge-method registry this hook knows")
    existing = present.get(name)
    if existing is None:
        if api == "0.1.5":
            registry.register(method)
        else:
            present[name] = method
        return True
    if existing is not method:
        import logging

        logging.getLogger(package + ".plugins").warning(
            "merge method %r from %s was not registered and steps aside: %s "
            "already has a method of that name (%s)",
            name,
            type(method).__module__,
            package,
            type(existing).__module__,
        )
        return False
    return True
