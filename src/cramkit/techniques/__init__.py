"""Techniques that plug into the trainer through hooks; see :mod:`cramkit.techniques.base`.

Importing this package registers every technique module in it: a new module dropped into this
folder needs no list to be added to. (One outside the package is a plugin: see
:mod:`cramkit.plugins`.)
"""

import importlib
import pkgutil

from .base import (
    TECHNIQUES,
    ContractCases,
    Technique,
    build_techniques,
    register,
    validate_technique_options,
)

# After the names above: a technique module may import them from this package as well as from
# ``.base``, while the package is still being initialised.
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "common"):  # the interface and shared helpers register nothing
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "TECHNIQUES",
    "ContractCases",
    "Technique",
    "build_techniques",
    "register",
    "validate_technique_options",
]
