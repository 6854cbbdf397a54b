"""Sweep statistics (experiments/sweep_results.py): the 95% interval of each cell against SciPy
and a NumPy bootstrap on fixed numbers, paired differences against the baseline at the same
fraction (seeds missing on one side, NaN, one pair, no pair), and how both reach summary.md and
results.json."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from experiments import sweep_results

AUCS = [0.81, 0.85, 0.79, 0.88, 0.83]


def row(init, fraction, seed, auc, test_set="test", status="finished"):
  return {"run_id": f"init={init}/frac={fraction:g}/seed={seed}", "init": init,
          "label_fraction": fraction, "seed": seed, "test_set": test_set, "status": status,
          "auc": auc, "accuracy": 0.5, "balanced_accuracy": 0.5, "ece": 0.1}


def test_cell_interval_matches_scipy_and_a_bootstrap():
  cell, = sweep_results.summarize([row("scratch", 0.1, s, v) for s, v in enumerate(AUCS)])
  assert cell["n"] == 5 and cell["auc_mean"] == pytest.approx(np.mean(AUCS), abs=1e-12)
  assert cell["auc_std"] == pytest.approx(np.std(AUCS, ddof=1), abs=1e-12)
  # Independent: the confidence interval of SciPy's one-sample t-test.
  expected = stats.ttest_1samp(AUCS, 0.0).confidence_interval(confidence_level=0.95)
  assert (cell["auc_ci_low"], cell["auc_ci_high"]) == pytest.approx(
      (expected.low, expected.high), abs=1e-12)
  # By hand: t_{0.975, 4} = 2.7764451 (tables); half-width 2.7764 * 0.034928 / sqrt(5).
  half_width = 2.7764451052 * np.std(AUCS, ddof=1) / math.sqrt(5)
  assert cell["auc_ci_high"] - cell["auc_mean"] == pytest.approx(half_width, rel=1e-9)
  # A bootstrap percentile interval of the mean is narrower (it ignores the t tails for n = 5)
  # but must lie inside the t-interval and be close to it.
  rng = np.random.default_rng(0)
  means = rng.choice(AUCS, size=(20000, len(AUCS)), replace=True).mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  assert cell["auc_ci_low"] < low < high < cell["auc_ci_high"]
  assert high - low == pytest.approx(cell["auc_ci_high"] - cell["auc_ci_low"], rel=0.5)


def test_interval_edge_cases():
  # Two seeds: t_{0.975, 1} = 12.706, as SciPy's t-test says.
  mean, std, low, high = sweep_results.mean_std_interval([0.8, 0.9])
  expected = stats.ttest_1samp([0.8, 0.9], 0.0).confidence_interval()
  assert (mean, std) == pytest.approx((0.85, 0.1 / math.sqrt(2)))
  assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-12)
  # One seed: std 0 (as before), no interval; a NaN value: NaN mean and interval.
  assert sweep_results.mean_std_interval([0.8])[:2] == (0.8, 0.0)
  assert all(math.isnan(x) for x in sweep_results.mean_std_interval([0.8])[2:])
  assert all(math.isnan(x) for x in sweep_results.mean_std_interval([0.8, math.nan, 0.9]))
  assert all(math.isnan(x) for x in sweep_results.mean_std_interval([]))
  # Identical values: a zero-width interval at the mean.
  assert sweep_results.mean_std_interval([0.7, 0.7, 0.7])[2:] == pytest.approx((0.7, 0.7))


def test_paired_differences_pair_seeds_at_the_same_fraction():
  baseline_10 = [0.70, 0.72, 0.69, 0.74]          # seeds 0-3
  remedis_10 = [0.75, 0.80, 0.71]                 # seeds 0-2: seed 3 did not finish
  rows = ([row("scratch", 0.1, s, v) for s, v in enumerate(baseline_10)]
          + [row("remedis", 0.1, s, v) for s, v in enumerate(remedis_10)]
          + [row("remedis", 0.1, 3, math.nan, status="failed")]
          # At 100%: the baseline has seeds 0 and 1 only, remedis 1 and 2 -> one pair (seed 1).
          + [row("scratch", 1.0, 0, 0.80), row("scratch", 1.0, 1, 0.82),
             row("remedis", 1.0, 1, 0.85), row("remedis", 1.0, 2, 0.86)]
          # At 50% the baseline did not run: no pair (it is not compared with 100%).
          + [row("remedis", 0.5, 0, 0.83)]
          # bit at 10% has a NaN value for seed 1.
          + [row("bit", 0.1, 0, 0.71), row("bit", 0.1, 1, math.nan)])
  pairs = sweep_results.paired_differences(rows, metric="macro_auc", baseline="scratch")
  by_key = {(p["init"], p["label_fraction"]): p for p in pairs}
  assert list(by_key) == [("remedis", 0.1), ("remedis", 0.5), ("remedis", 1.0), ("bit", 0.1)]

  p = by_key[("remedis", 0.1)]
  differences = np.subtract(remedis_10, baseline_10[:3])
  assert (p["n"], p["seeds"], p["unpaired_seeds"]) == (3, [0, 1, 2], [3])
  assert p["metric"] == "auc" and p["baseline"] == "scratch" and p["test_set"] == "test"
  assert p["differences"] == pytest.approx(differences.tolist(), abs=1e-12)
  expected = stats.ttest_rel(remedis_10, baseline_10[:3]).confidence_interval()
  assert (p["mean"], p["std"]) == pytest.approx(
      (differences.mean(), np.std(differences, ddof=1)), abs=1e-12)
  assert (p["ci_low"], p["ci_high"]) == pytest.approx((expected.low, expected.high), abs=1e-12)

  p = by_key[("remedis", 1.0)]
  assert (p["n"], p["seeds"], p["unpaired_seeds"]) == (1, [1], [0, 2])
  assert (p["mean"], p["std"]) == pytest.approx((0.03, 0.0))
  assert math.isnan(p["ci_low"]) and math.isnan(p["ci_high"])

  p = by_key[("remedis", 0.5)]
  assert (p["n"], p["seeds"], p["unpaired_seeds"]) == (0, [], [0])
  assert math.isnan(p["mean"])

  p = by_key[("bit", 0.1)]
  assert p["n"] == 2 and math.isnan(p["mean"]) and math.isnan(p["ci_low"])

  # inits picks and orders; the baseline itself is never paired with itself.
  only = sweep_results.paired_differences(rows, metric="auc", baseline="scratch",
                                          inits=["bit", "scratch"])
  assert [(p["init"], p["label_fraction"]) for p in only] == [("bit", 0.1)]

  table = sweep_results.format_paired_table(pairs, metric="auc", baseline="scratch")
  assert "## Paired difference vs `scratch` at the same fraction, per seed: mean [95% CI] (n)" \
      in table
  lo, hi = expected.low, expected.high
  assert (f"| remedis | +{differences.mean():.3f} [{lo:+.3f}, {hi:+.3f}] (3, 1 unpaired) | "
          "no common seed with scratch | +0.030 (1, 2 unpaired) |") in table
  assert "| bit | nan (2, 2 unpaired) |  |  |" in table  # NaN, not "+nan"


def test_duplicate_seed_is_an_error():
  rows = [row("scratch", 0.1, 0, 0.7), row("scratch", 0.1, 0, 0.8)]
  with pytest.raises(ValueError, match="seed=0"):
    sweep_results.paired_differences(rows, metric="auc", baseline="scratch")


def test_grid_and_match_tables_show_intervals():
  rows = ([row("scratch", 1.0, s, v) for s, v in enumerate(AUCS)]
          + [row("remedis", 0.1, s, v + 0.01) for s, v in enumerate(AUCS)]
          + [row("remedis", 1.0, 0, 0.9)])
  cells = sweep_results.summarize(rows)
  expected = stats.ttest_1samp(AUCS, 0.0).confidence_interval()
  lo, hi = expected.low, expected.high
  assert np.std(AUCS, ddof=1) == pytest.approx(0.034928, abs=1e-6)
  grid = sweep_results.format_grid_table(cells, metric="auc")
  assert f"| scratch |  | 0.832 +- 0.035 [{lo:.3f}, {hi:.3f}] (5) |" in grid
  assert (f"| remedis | 0.842 +- 0.035 [{lo + 0.01:.3f}, {hi + 0.01:.3f}] (5) | "
          "0.900 +- 0.000 (1) |") in grid
  matches = sweep_results.matching_fractions(cells, metric="auc", baseline="scratch",
                                             inits=["scratch", "remedis"])
  assert matches[1]["match_ci"] == pytest.approx([lo + 0.01, hi + 0.01])
  assert matches[0]["baseline_ci"] == pytest.approx([lo, hi])
  table = sweep_results.format_match_table(matches, metric="auc", baseline="scratch",
                                           baseline_fraction=1.0, tolerance=0.0)
  assert (f"| test | 0.832 [{lo:.3f}, {hi:.3f}] | 100% (0.832 [{lo:.3f}, {hi:.3f}]) | "
          f"10% (0.842 [{lo + 0.01:.3f}, {hi + 0.01:.3f}]) |") in table


def test_write_outputs_stores_intervals_and_pairs(tmp_path):
  rows = ([row("scratch", f, s, 0.7 + 0.1 * f + 0.01 * s) for f in (0.1, 1.0) for s in (0, 1, 2)]
          + [row("remedis", f, s, 0.75 + 0.1 * f + 0.02 * s) for f in (0.1, 1.0)
             for s in (0, 1, 2)])
  outputs = sweep_results.write_outputs(rows, str(tmp_path), metric="macro_auc",
                                        baseline="scratch", baseline_fraction=1.0,
                                        tolerance=0.0, inits=["scratch", "remedis"])
  stored = json.loads((tmp_path / sweep_results.JSON_FILE).read_text())
  assert stored["interval"] == sweep_results.INTERVAL
  assert [(p["init"], p["label_fraction"], p["n"]) for p in stored["paired"]] == [
      ("remedis", 0.1, 3), ("remedis", 1.0, 3)]
  # Differences 0.05, 0.06, 0.07 at both fractions.
  expected = stats.ttest_1samp([0.05, 0.06, 0.07], 0.0).confidence_interval()
  for p in stored["paired"]:
    assert (p["mean"], p["ci_low"], p["ci_high"]) == pytest.approx(
        (0.06, expected.low, expected.high), abs=1e-9)
  assert all("auc_ci_low" in c and "auc_ci_high" in c for c in stored["cells"])
  table = (tmp_path / sweep_results.TABLE_FILE).read_text()
  assert table == outputs["table"] + "\n" and outputs["paired"] == stored["paired"]
  assert ("| remedis | +0.060 [+0.035, +0.085] (3) | +0.060 [+0.035, +0.085] (3) |"
          in table)
