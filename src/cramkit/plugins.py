"""Techniques, optimizers, schedules and tasks kept outside cramkit: plugin modules that
register them.

A plugin is an ordinary Python module that calls cramkit's registration decorators
(:func:`cramkit.techniques.register`, :func:`cramkit.optim.register_optimizer`,
:func:`cramkit.schedules.register_lr`, :func:`cramkit.eval.tasks.register_task`) when imported.
The command line imports, before it reads any option:

- every module named in ``CRAMKIT_PLUGINS``, comma-separated: an importable module name
  (``mylab.freeze``) or the path of a ``.py`` file (``plugins/freeze.py``);
- every entry point of the group ``cramkit.plugins`` that installed packages declare
  (``[project.entry-points."cramkit.plugins"] freeze = "mylab.freeze"`` in their pyproject.toml),
  so that an installed plugin needs no environment variable.

Under ``torchrun`` every rank imports them the same way (the environment is inherited). A
program that calls cramkit's Python API imports its plugin modules itself.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .configbase import did_you_mean
from .errors import ConfigError

ENV = "CRAMKIT_PLUGINS"
ENTRY_POINT_GROUP = "cramkit.plugins"


def unknown_hint(name: str, known) -> str:
    """What the error for ``name``, which no registry holds, adds: the close name it probably
    misspells, or else where a plugin's name comes from."""
    return did_you_mean(name, known) or f" (a plugin's is found once {ENV} names its module)"

_loaded: dict[str, ModuleType] = {}


def load_plugins() -> list[str]:
    """Import every plugin named in ``CRAMKIT_PLUGINS`` and by ``cramkit.plugins`` entry points
    (each once per process); returns their names, in import order.

    A plugin that cannot be found is a ConfigError naming it; an error raised by the plugin's
    own code propagates with its traceback, which its author needs.
    """
    for spec in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        if spec not in _loaded:
            _loaded[spec] = _import_file(spec) if spec.endswith(".py") else _import_module(spec)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = f"{entry.name}={entry.value}"
        if key not in _loaded:
            try:
                loaded = entry.load()
            except ModuleNotFoundError as exc:
                if not _names(entry.module, exc.name):
                    raise  # the plugin itself imports something missing: its author's traceback
                raise ConfigError(f"plugin entry point '{key}' (group {ENTRY_POINT_GROUP}): {exc}; "
                                  "reinstall the package that declares it, or uninstall it") from None
            _loaded[key] = loaded if isinstance(loaded, ModuleType) else sys.modules[entry.module]
    return list(_loaded)


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not _names(name, exc.name):
            raise  # the plugin itself imports something missing: its author's traceback
        raise ConfigError(f"{ENV}: no module named '{name}' (a module on the Python path, or a .py file)") from None


def _names(module: str, missing: str | None) -> bool:
    """Whether a ModuleNotFoundError for ``missing`` is about ``module`` itself (or a package
    above it), not about something its code imports."""
    return missing is not None and (module == missing or module.startswith(missing + "."))


def _import_file(path: str) -> ModuleType:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{ENV}: plugin file '{path}' not found")
    # A name of its own, registered before the code runs: dataclasses (a technique's options)
    # look their module up in sys.modules, and two plugin files may share a stem.
    digest = hashlib.blake2b(str(file.resolve()).encode(), digest_size=4).hexdigest()
    name = f"cramkit_plugin_{digest}_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{ENV}: '{path}' cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
