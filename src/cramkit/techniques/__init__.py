"""Techniques that plug into the trainer through hooks; see :mod:`cramkit.techniques.base`.

Importing this package registers every shipped technique.
"""

from .base import TECHNIQUES, Technique, build_techniques, register, validate_technique_options

__all__ = ["TECHNIQUES", "Technique", "build_techniques", "register", "validate_technique_options"]
