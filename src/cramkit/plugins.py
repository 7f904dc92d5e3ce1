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

A run records the plugins its process loaded (``environment.json``'s ``plugins``: module names,
and files as absolute paths). Whatever reads the run again (a resume, fine-tuning, evaluation,
export, prediction) imports the recorded modules that are not loaded, except one that would be
imported from inside the run directory; a recorded file is not run unasked (a run directory may
come from someone else), and a name that only a plugin not loaded
could have registered is an error that names the plugin and how to load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from .configbase import did_you_mean
from .errors import ConfigError

ENV = "CRAMKIT_PLUGINS"
ENTRY_POINT_GROUP = "cramkit.plugins"


def unknown_hint(name: str, known) -> str:
    """What the error for ``name``, which no registry holds, adds: the plugins that the run being
    read recorded and that are not loaded (the name is theirs, not a misspelling of a shipped
    one), else the close name it probably misspells, or else where a plugin's name comes from."""
    if _missing:
        why = "; ".join(f"{spec}, which {reason}" for spec, (reason, _) in _missing.items())
        todo = " and ".join(dict.fromkeys(todo for _, todo in _missing.values()))
        plural = "s" if len(_missing) > 1 else ""
        return f" (this run was trained with plugin{plural} {why}: {todo})"
    return did_you_mean(name, known) or f" (a plugin's is found once {ENV} names its module)"


#: Plugins imported in this process, by what names them: a module, a file's absolute path, or
#: an entry point's ``name=value``.
_loaded: dict[str, ModuleType] = {}
#: While a run is read: the plugins it recorded that are not loaded, with why and what loads them.
_missing: dict[str, tuple[str, str]] = {}


def load_plugins() -> list[str]:
    """Import every plugin named in ``CRAMKIT_PLUGINS`` and by ``cramkit.plugins`` entry points
    (each once per process); returns their names, in import order.

    A plugin that cannot be found is a ConfigError naming it; an error raised by the plugin's
    own code propagates with its traceback, which its author needs.
    """
    for spec in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        _load(spec)
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


def _load(spec: str) -> None:
    # A file by its absolute path: named relatively in one command and absolutely in the next (as
    # a run records it), it is still one module, imported once.
    if spec.endswith(".py"):
        key = str(Path(spec).resolve())
        if key not in _loaded:
            _loaded[key] = _import_file(spec)
    elif spec not in _loaded:
        _loaded[spec] = _import_module(spec)


def recorded() -> list[str]:
    """The plugins loaded in this process as a run records them: module names (an entry point's
    module) and absolute paths of files, in import order."""
    return list(dict.fromkeys(key if key.endswith(".py") else module.__name__ for key, module in _loaded.items()))


def run_plugins_recorded(run_dir: str | Path) -> list[str]:
    """The plugins that ``run_dir``'s ``environment.json`` records, its resumes' included."""
    try:
        env = json.loads((Path(run_dir) / "environment.json").read_text())
    except (OSError, ValueError):  # no record (an earlier cramkit's run), or a damaged one: nothing to load
        return []
    if not isinstance(env, dict):
        return []

    def listed(value: object) -> list:  # a field of another type: a damaged file, nothing recorded
        return value if isinstance(value, list) else []

    segments = [env, *(r for r in listed(env.get("resumes")) if isinstance(r, dict))]
    return list(dict.fromkeys(spec for segment in segments for spec in listed(segment.get("plugins"))
                              if isinstance(spec, str) and spec))


@contextlib.contextmanager
def run_plugins(run_dir: str | Path) -> Iterator[None]:
    """Read ``run_dir`` with the plugins it recorded: each recorded module that is not loaded is
    imported; a recorded file is not (it runs only when ``CRAMKIT_PLUGINS`` names it). Those that
    stay missing are named by every unknown-name error raised inside, instead of a shipped name
    that the plugin's resembles. A run that needs none of them (export of a run trained with a
    plugin's technique) reads as before."""
    global _missing
    missing: dict[str, tuple[str, str]] = {}
    specs = run_plugins_recorded(run_dir)
    files = [spec for spec in specs if spec.endswith(".py") and str(Path(spec).resolve()) not in _loaded]
    here = ",".join(spec for spec in files if Path(spec).is_file())  # one setting that loads them all
    for spec in files:
        missing[spec] = (("is not loaded", f"set {ENV}={here}") if Path(spec).is_file()
                         else ("is no longer at that path", f"name it where it is now in {ENV}"))
    for spec in specs:
        if spec.endswith(".py") or spec in _loaded or spec in {m.__name__ for m in _loaded.values()}:
            continue
        if _origin(spec) in {_origin_of(m) for m in _loaded.values()} - {None}:
            continue  # loaded as its file under another name: importing it again registers twice
        if _found_inside(spec, Path(run_dir)):
            # The run directory on the Python path (``python -m cramkit`` run from inside it): the
            # recorded name would import a file that came with the directory, as good as running it.
            missing[spec] = ("would be imported from the run directory itself",
                             f"set {ENV}={spec} if you trust that code")
            continue
        try:
            _load(spec)
        except ConfigError:  # not found here: said where a name it registered is missing
            missing[spec] = (f"cannot be imported here: no module named '{spec}'",
                             f"install it, or name the module that registers it in {ENV}")
    before, _missing = _missing, missing
    try:
        yield
    finally:
        _missing = before


def _origin(name: str) -> Path | None:
    """The file module ``name`` would be imported from, without importing anything (a dotted
    name only once its parent package is imported), or None."""
    if "." in name and name.rpartition(".")[0] not in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve() if spec is not None and spec.has_location and spec.origin else None


def _origin_of(module: ModuleType) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


def _found_inside(name: str, folder: Path) -> bool:
    """Whether importing module ``name`` would run a file inside ``folder``. Only the top-level
    package is looked up (``find_spec`` of a dotted name imports its parents)."""
    top = name.split(".")[0]
    if top in sys.modules:  # imported already: its code has run, from wherever it came
        return False
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    places = [*(spec.submodule_search_locations or []), *([spec.origin] if spec.has_location else [])]
    folder = folder.resolve()
    return any(Path(place).resolve().is_relative_to(folder) for place in places)


def _import_module(name: str) -> ModuleType:
    # importlib reads ".x" as a relative import and fails with a TypeError traceback; "a b" or
    # "x..y" are no module's name either, whether typed or read from a damaged environment.json.
    if not all(part.isidentifier() for part in name.split(".")):
        raise ConfigError(f"{ENV}: '{name}' is not a module name (dotted Python identifiers) nor a .py file")
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
    if name in sys.modules:  # imported already (a file's registrations refuse to run twice)
        return sys.modules[name]
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
