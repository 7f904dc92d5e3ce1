"""Metrics agree with scikit-learn / scipy; the GLUE average follows cramming's convention."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from cramkit.errors import ConfigError
from cramkit.eval import metrics as M


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert M.accuracy(p, y) == pytest.approx(accuracy_score(y, p))
    assert M.f1(p, y) == pytest.approx(f1_score(y, p))
    assert M.matthews(p, y) == pytest.approx(matthews_corrcoef(y, p))
    y3, p3 = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert M.macro_f1(p3, y3) == pytest.approx(f1_score(y3, p3, average="macro"))


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    y = rng.uniform(0, 5, 300)
    p = y + rng.normal(0, 1.5, 300)
    assert M.pearson(p, y) == pytest.approx(pearsonr(p, y)[0])
    assert M.spearman(p, y) == pytest.approx(spearmanr(p, y)[0])


def test_constant_prediction_correlation_is_zero_not_nan():
    assert M.pearson([1.0] * 10, list(range(10))) == 0.0
    assert M.spearman([2.0] * 10, list(range(10))) == 0.0


def test_compute_metrics_and_unknown_metric():
    out = M.compute_metrics(["f1", "accuracy"], [1, 0, 1, 1], [1, 0, 0, 1])
    assert out == {"f1": pytest.approx(0.8), "accuracy": pytest.approx(0.75)}
    with pytest.raises(ConfigError, match="unknown metric 'acuracy'.*did you mean 'accuracy'"):
        M.get_metric("acuracy")


def test_glue_average_excludes_wnli_and_counts_mnli_twice():
    results = {
        "mnli-m": {"accuracy": 0.841},
        "mnli-mm": {"accuracy": 0.846},
        "qqp": {"f1": 0.875},
        "qnli": {"accuracy": 0.902},
        "sst2": {"accuracy": 0.920},
        "cola": {"matthews": 0.533},
        "stsb": {"pearson": 0.874},
        "mrpc": {"f1": 0.889},
        "rte": {"accuracy": 0.585},
        "wnli": {"accuracy": 0.0},
    }
    # cramming's released checkpoint: these per-task numbers average to its reported 80.7.
    assert M.glue_average(results) == pytest.approx(0.807, abs=5e-4)
    without = {k: v for k, v in results.items() if k != "wnli"}
    assert M.glue_average(results) == M.glue_average(without)
    assert M.glue_average({"wnli": {"accuracy": 1.0}}) is None


def test_task_score_is_the_target_metric_and_median_over_seeds():
    # cramming's target_metrics: MRPC/QQP F1, STS-B Pearson; the rest is reported, not averaged.
    assert M.task_score({"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.9)
    assert M.task_score({"pearson": 0.5, "spearman": 0.7}) == pytest.approx(0.5)
    assert M.metrics_mean({"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.85)
    both = {"mrpc": {"f1": 0.9, "accuracy": 0.8}, "cola": {"matthews": 0.3}}
    assert M.glue_average(both) == pytest.approx(0.6)
    assert M.glue_average(both, M.metrics_mean) == pytest.approx(0.575)
    runs = [
        {"accuracy": 0.1, "f1": 0.5},
        {"accuracy": 0.3, "f1": 0.2},
        {"accuracy": 0.2, "f1": 0.9},
    ]
    assert M.median_metrics(runs) == {"accuracy": 0.2, "f1": 0.5}


def test_the_median_of_an_even_number_of_seeds_is_the_mean_of_the_middle_two():
    """finetune.seeds may be any number; with 2 or 4 seeds the median is no single seed's value."""
    runs = [{"accuracy": a, "f1": f} for a, f in ((0.1, 0.8), (0.4, 0.2), (0.2, 0.6), (0.9, 0.4))]
    assert M.median_metrics(runs) == {"accuracy": pytest.approx(0.3), "f1": pytest.approx(0.5)}
    assert M.median_metrics(runs[:2]) == {"accuracy": pytest.approx(0.25), "f1": pytest.approx(0.5)}
