"""Downstream evaluation: task loading, fine-tuning (full or PEFT), metrics, GLUE reports.

Entry points: :func:`~cramkit.eval.tasks.load_task`, :func:`~cramkit.eval.finetune.finetune`,
:func:`~cramkit.eval.finetune.finetune_demo`, :func:`~cramkit.eval.suite.evaluate_glue`,
:func:`~cramkit.eval.finetuned.load_finetuned` (saved fine-tuned weights, to predict); the CLI
subcommands live in :mod:`cramkit.eval.cli`.
"""

from __future__ import annotations

from .finetune import Backbone, FinetuneConfig, finetune, finetune_demo, load_backbone
from .finetuned import FinetunedModel, load_finetuned
from .metrics import METRICS, compute_metrics, glue_average
from .suite import evaluate_glue
from .tasks import TASKS, TaskData, TaskSpec, get_task, load_task

__all__ = [
    "METRICS",
    "TASKS",
    "Backbone",
    "FinetuneConfig",
    "FinetunedModel",
    "TaskData",
    "TaskSpec",
    "compute_metrics",
    "evaluate_glue",
    "finetune",
    "finetune_demo",
    "get_task",
    "glue_average",
    "load_backbone",
    "load_finetuned",
    "load_task",
]
