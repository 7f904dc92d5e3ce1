"""Downstream metrics, computed by scikit-learn / scipy, and the GLUE average.

Conventions (cramming's evaluation code: ``eval.py`` and the ``target_metrics`` of its
``config/eval/tasks/*.yaml``):

- a task entry's score is its *target metric*, the first metric it lists: CoLA Matthews
  correlation, MRPC and QQP F1, STS-B Pearson, every other GLUE task accuracy (the other metrics,
  e.g. MRPC accuracy or STS-B Spearman, are reported but not averaged);
- the GLUE average is the mean over task entries, WNLI excluded, with MNLI matched and mismatched
  counted as **two entries** (``mnli-m`` and ``mnli-mm``). This reproduces cramming's reported
  80.7 from its per-task numbers (averaging m/mm into one MNLI entry would give 80.3);
- :func:`metrics_mean` is the GLUE leaderboard's per-task convention instead (the mean of a task's
  metrics, e.g. MRPC (F1 + accuracy) / 2); reports give the average under it as a second number.

All values are on a 0-100 scale in reports; the functions here return the raw 0-1 (or -1..1)
value and :func:`to_percent` converts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..configbase import did_you_mean
from ..errors import ConfigError

MetricFn = Callable[[Sequence, Sequence], float]

#: Tasks left out of the GLUE average (WNLI's dev set is adversarial to its train set).
EXCLUDED_FROM_AVERAGE = frozenset({"wnli"})


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    """Fraction of exact matches."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(np.asarray(labels), np.asarray(predictions)))


def f1(predictions: Sequence, labels: Sequence) -> float:
    """Binary F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(labels), np.asarray(predictions), zero_division=0.0))


def macro_f1(predictions: Sequence, labels: Sequence) -> float:
    """Unweighted mean of per-class F1 (for multi-class tasks outside GLUE)."""
    from sklearn.metrics import f1_score

    return float(
        f1_score(np.asarray(labels), np.asarray(predictions), average="macro", zero_division=0.0)
    )


def matthews(predictions: Sequence, labels: Sequence) -> float:
    """Matthews correlation coefficient (CoLA)."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(np.asarray(labels), np.asarray(predictions)))


def _correlation(fn, predictions: Sequence, labels: Sequence) -> float:
    p = np.asarray(predictions, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    # A constant prediction (a collapsed regressor) has no defined correlation; scipy warns and
    # returns nan. Scoring it 0 keeps averages finite and says "no signal".
    if p.size < 2 or np.all(p == p[0]) or np.all(y == y[0]):
        return 0.0
    value = float(fn(p, y)[0])
    return 0.0 if math.isnan(value) else value


def pearson(predictions: Sequence, labels: Sequence) -> float:
    """Pearson correlation (STS-B)."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, predictions, labels)


def spearman(predictions: Sequence, labels: Sequence) -> float:
    """Spearman rank correlation (STS-B)."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, predictions, labels)


#: Metric name -> function(predictions, labels) -> float.
METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def get_metric(name: str) -> MetricFn:
    """Look a metric up by name; unknown names list the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise ConfigError(
            f"unknown metric '{name}'{did_you_mean(name, METRICS)}; known: {', '.join(METRICS)}"
        ) from None


#: Metrics of class predictions (scikit-learn refuses them on real-valued regression targets).
CLASSIFICATION_METRICS = frozenset({"accuracy", "f1", "macro_f1", "matthews"})
#: Metrics defined for two classes only (``f1`` scores the positive class, label index 1).
BINARY_METRICS = frozenset({"f1"})


def check_metrics(names: Sequence[str], is_regression: bool, num_labels: int | None) -> None:
    """Refuse metric names that are unknown or do not fit the task, before any training.

    Metrics are computed only after fine-tuning; a name that cannot be computed would otherwise
    surface as an error (or scikit-learn's traceback) once all the training time is spent.
    """
    if not names:
        raise ConfigError("a task needs at least one metric")
    for name in names:
        get_metric(name)
    if is_regression:
        bad = [n for n in names if n in CLASSIFICATION_METRICS]
        if bad:
            raise ConfigError(
                f"metrics {', '.join(bad)}: they score class predictions, not a regression "
                "task (use pearson, spearman)"
            )
    elif num_labels != 2:
        bad = [n for n in names if n in BINARY_METRICS]
        if bad:
            raise ConfigError(
                f"metrics {', '.join(bad)}: binary (F1 of label index 1), but the task has "
                f"{num_labels} labels (use macro_f1)"
            )


def compute_metrics(
    names: Iterable[str], predictions: Sequence, labels: Sequence
) -> dict[str, float]:
    """Every named metric on one set of predictions."""
    return {name: get_metric(name)(predictions, labels) for name in names}


def task_score(metrics: Mapping[str, float]) -> float:
    """One number per task entry: its target metric, the first in ``metrics`` (cramming's
    ``target_metrics``: MRPC/QQP F1, STS-B Pearson, CoLA Matthews, others accuracy)."""
    if not metrics:
        raise ValueError("task_score of no metrics")
    return float(next(iter(metrics.values())))


def metrics_mean(metrics: Mapping[str, float]) -> float:
    """The mean of an entry's metrics (the GLUE leaderboard's score for MRPC, QQP, STS-B)."""
    if not metrics:
        raise ValueError("metrics_mean of no metrics")
    return float(statistics.fmean(metrics.values()))


def glue_average(
    results: Mapping[str, Mapping[str, float]],
    score: Callable[[Mapping[str, float]], float] = task_score,
) -> float | None:
    """The GLUE average of ``{entry: {metric: value}}``, each entry scored by ``score``.

    Entries are task names, except MNLI which appears as ``mnli-m`` and ``mnli-mm`` (two entries,
    as cramming counts them). WNLI is excluded. Returns None when nothing is left to average.
    """
    scores = [
        score(metrics)
        for entry, metrics in results.items()
        if entry.lower() not in EXCLUDED_FROM_AVERAGE and metrics
    ]
    return float(statistics.fmean(scores)) if scores else None


def median_metrics(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-metric median over several fine-tuning seeds (cramming reports the median of 5)."""
    if not runs:
        return {}
    return {name: float(statistics.median(r[name] for r in runs)) for name in runs[0]}


def to_percent(value: float | None) -> float | None:
    """A 0-1 metric as 0-100, rounded for tables (None stays None)."""
    return None if value is None else round(100.0 * value, 2)
