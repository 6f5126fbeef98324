"""Start-up hook that lets installed packages add merge methods to mergekit.

mergekit has no plugin entry points, so this module (run from a .pth or PEP 829
.start file) puts one cheap finder on sys.meta_path. It ignores every import
except the package ``mergekit.merge_methods``; right after that package (and
with it the registry) has first been imported, it registers every method that
an installed package declares under the entry-point group
``mergekit.merge_methods``. Waiting for the whole package, not just its
registry module, lets plugins use any of mergekit's merge-method helpers. An entry point's object is either
a mergekit ``MergeMethod`` (registered under its ``spec.name``) or a callable
taking no arguments that registers its methods itself.

Nothing is imported at start-up beyond this file. A failing plugin is logged and
skipped; mergekit and the other plugins keep working. Set
NEARSWAP_MERGEKIT_NO_HOOK=1 to switch the hook off.
"""

import os
import sys

ENTRY_POINT_GROUP = "mergekit.merge_methods"
DISABLE_VARIABLE = "NEARSWAP_MERGEKIT_NO_HOOK"
_TARGET = "mergekit.merge_methods"
_MARK = "_mergekit_plugin_hook"


def install():
    """Arm the hook (idempotent); the .pth and .start files call this at start-up."""
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return
    if any(getattr(finder, _MARK, False) for finder in sys.meta_path):
        return
    if _TARGET in sys.modules:  # installed late: mergekit is already there
        load_plugins()
        return
    sys.meta_path.insert(0, _MergeMethodsFinder())


class _MergeMethodsFinder:
    """A plain meta-path finder (importlib.abc would cost an import at start-up).

    Finding a spec changes nothing: a probe such as importlib.util.find_spec
    gets a wrapped spec too, and only the import that executes the package
    spends the hook.
    """

    _mergekit_plugin_hook = True
    fired = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or self.fired:
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
        if self._finder.fired:
            return
        self._finder.fired = True
        # Python binds the submodule on its parent only after this returns; bind
        # it now, so `import mergekit.merge_methods as mm` works inside plugins.
        parent, _, child = module.__name__.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)
        load_plugins()


def load_plugins():
    """Register every method declared under ENTRY_POINT_GROUP; never raises."""
    import logging

    log = logging.getLogger("mergekit.plugins")
    try:
        from importlib.metadata import entry_points

        declared = entry_points(group=ENTRY_POINT_GROUP)
    except Exception as error:  # a broken distribution must not break mergekit
        log.warning("mergekit plugins: cannot list entry points: %s", error)
        return
    seen = set()
    for entry_point in declared:
        if entry_point.value in seen:  # the same distribution seen on two paths
            continue
        seen.add(entry_point.value)
        try:
            register_object(entry_point.load())
        except Exception as error:
            log.warning(
                "mergekit plugin %r (%s) was skipped: %s: %s",
                entry_point.name,
                entry_point.value,
                type(error).__name__,
                error,
            )


def register_object(obj):
    """Register a MergeMethod, or call a registration function."""
    if not hasattr(obj, "spec") and not hasattr(obj, "make_task") and callable(obj):
        obj()
    else:
        register_method(obj)


def register_method(method) -> bool:
    """Register a MergeMethod with mergekit 0.1.5's registry or 0.1.4's dict.

    True when `method` is the registered one (now or already); False, with a
    warning, when mergekit already has a different method of that name.
    """
    from mergekit.merge_methods import registry

    if hasattr(registry, "register"):  # mergekit 0.1.5
        name = method.spec.name
        present = {m.spec.name: m for m in registry.registered_methods()}
    else:  # mergekit 0.1.4
        name = method.name()
        present = registry.REGISTERED_MERGE_METHODS
    existing = present.get(name)
    if existing is None:
        if hasattr(registry, "register"):
            registry.register(method)
        else:
            present[name] = method
        return True
    if existing is not method:
        import logging

        logging.getLogger("mergekit.plugins").warning(
            "merge method %r from %s was not registered and steps aside: mergekit "
            "already has a method of that name (%s)",
            name,
            type(method).__module__,
            type(existing).__module__,
        )
        return False
    return True
