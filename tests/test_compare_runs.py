"""experiments/compare_runs.py: equal runs compare equal whatever their timings; any changed
value is found and named."""

import json

from experiments import compare_runs


def write_run(folder, loss, wall=1.0):
  folder.mkdir()
  (folder / "metrics.jsonl").write_text(
      json.dumps({"step": 1, "time": wall, "train/loss": loss, "train/images_per_s": 1 / wall})
      + "\n" + json.dumps({"step": 2, "time": wall + 1, "train/loss": loss / 2}) + "\n")
  (folder / "results.json").write_text(json.dumps(
      {"finished": True, "wall_time_s": wall, "run_dir": str(folder),
       "test_sets": {"test": {"metrics": {"macro_auc": 0.75}}}}))
  return str(folder)


def test_equal_runs_differ_only_in_what_is_ignored(tmp_path):
  a = write_run(tmp_path / "a", 0.5, wall=1.0)
  b = write_run(tmp_path / "b", 0.5, wall=7.0)
  count, found = compare_runs.differences(a, b)
  assert count == 4 and found == []  # two losses, finished, macro_auc
  assert compare_runs.main([a, b]) == 0


def test_a_changed_value_is_named(tmp_path, capsys):
  a = write_run(tmp_path / "a", 0.5)
  b = write_run(tmp_path / "b", 0.5000001)
  _, found = compare_runs.differences(a, b)
  assert found == [((1, "train/loss"), 0.5, 0.5000001), ((2, "train/loss"), 0.25, 0.25000005)]
  assert compare_runs.main([a, b]) == 1
  assert "2 differ" in capsys.readouterr().out
  # A folder with nothing to compare is not "equal".
  (tmp_path / "empty").mkdir()
  assert compare_runs.main([a, str(tmp_path / "empty")]) == 1
