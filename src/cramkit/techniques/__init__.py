"""Techniques that plug into the trainer through hooks; see :mod:`cramkit.techniques.base`.

Importing this package registers every shipped technique.
"""

from . import pld, seqwarmup, stacking, vcycle  # noqa: F401  (registration)
from .base import (
    TECHNIQUES,
    ContractCases,
    Technique,
    build_techniques,
    register,
    validate_technique_options,
)

__all__ = [
    "TECHNIQUES",
    "ContractCases",
    "Technique",
    "build_techniques",
    "register",
    "validate_technique_options",
]
