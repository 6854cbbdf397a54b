"""Test sets of another dataset (config.test_sets "name=split@SOURCE:LOCATION") and
experiments/evaluate_run.py: parsing, the checks against the run (file and field named), and
scores equal to the trainer's own and to scikit-learn's on the reported probabilities."""

import csv
import json
import os

from absl import flags
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from configs import common, finetune as finetune_config
from experiments import evaluate_run
from remedis_jax import test_sets, train_finetune


def _images(rng, labels, size, channels=1, contrast=100):
  """Noise with a brighter centre for class 1: something for two steps to pick up."""
  shape = (len(labels), size, size) + ((channels,) if channels > 1 else ())
  images = rng.integers(0, 150, shape).astype(np.int32)
  c = slice(size // 4, 3 * size // 4)
  images[:, c, c] += contrast * np.asarray(labels).reshape((-1,) + (1,) * (len(shape) - 1))
  return np.clip(images, 0, 255).astype(np.uint8)


def _write_npz(path, seed, size=28, channels=1, contrast=100, **split_labels):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, labels in split_labels.items():
    labels = np.asarray(labels)
    arrays[f"{split}_images"] = _images(rng, labels.reshape(len(labels), -1)[:, 0], size,
                                        channels, contrast)
    arrays[f"{split}_labels"] = labels.reshape(len(labels), -1)
  np.savez(path, **arrays)
  return str(path)


def _binary(n, seed):
  labels = np.random.default_rng(seed).integers(0, 2, n)
  labels[:2] = (0, 1)  # both classes in every split
  return labels


def run_config(path, test_sets):
  """configs/finetune.py:medmnist shrunk to seconds: R_micro, one channel, 2 steps."""
  config = finetune_config.get_config("medmnist")
  return common.override(config, {
      "data.path": path, "data.num_channels": 1, "model.name": "R_micro", "total_epochs": -1.0,
      "total_steps": 2, "batch_size": 16, "eval_batch_size": 16, "eval_every_steps": 2,
      "log_every_steps": 1, "checkpoint_every_steps": 2, "async_checkpointing": False,
      "robustness.perturbations": (), "mesh.devices": 1, "test_sets": test_sets})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A run on hospital A's file that also names hospital B's (40 px, fainter findings) as a
  test set."""
  folder = tmp_path_factory.mktemp("hospitals")
  hospital_a = _write_npz(folder / "hospital_a.npz", 0, train=_binary(48, 1),
                          val=_binary(16, 2), test=_binary(16, 3))
  hospital_b = _write_npz(folder / "hospital_b.npz", 4, size=40, contrast=40,
                          test=_binary(20, 5))
  workdir = str(folder / "run")
  results = train_finetune.train_and_evaluate(
      run_config(hospital_a, ("test", f"hospital_b=test@medmnist:{hospital_b}")), workdir)
  return {"folder": folder, "workdir": workdir, "results": results, "hospital_a": hospital_a,
          "hospital_b": hospital_b}


def _assert_same_metrics(got, expected):
  """The same metrics up to rounding. The trainer and evaluate_run compute the probabilities in
  separate programs, so the float sums behind ECE or a mean may differ in the last bits; one
  changed prediction moves an AUC, an accuracy or a sensitivity by at least 1/N."""
  assert got.keys() == expected.keys()
  assert got == pytest.approx(expected, rel=0, abs=1e-9, nan_ok=True)


def _assert_same_roc_curves(got, expected):
  """The same ROC points (fractions of counts) at the same thresholds up to rounding (the
  thresholds are the probabilities themselves)."""
  assert got.keys() == expected.keys()
  for name, curve in got.items():
    assert curve.keys() == expected[name].keys()
    assert (curve["fpr"], curve["tpr"]) == (expected[name]["fpr"], expected[name]["tpr"])
    as_floats = lambda values: np.array([np.nan if v is None else v for v in values], float)
    np.testing.assert_allclose(as_floats(curve["thresholds"]),
                               as_floats(expected[name]["thresholds"]), rtol=0, atol=1e-9)


# ------------------------------------------------------------------------ fast checks
def test_test_set_forms_parse_and_errors_name_the_entry_and_the_forms():
  parse = lambda *specs: test_sets.parse_test_sets(specs, "medmnist")
  test, adult = parse("test", "adult=test@medmnist:/d/adult_cxr.npz")
  assert test == test_sets.TestSet("test", "test", "")
  assert adult == test_sets.TestSet("adult", "test", "", (("path", "/d/adult_cxr.npz"),
                                                               ("source", "medmnist")))
  # Default name: the file's stem and the split. A folder's root is the manifest's folder.
  (folder,) = parse("all@folder:/d/x/labels.csv;split_column=;label_columns=finding")
  assert folder.name == "labels_all" and dict(folder.data) == {
      "source": "folder", "manifest": "/d/x/labels.csv", "root": "/d/x", "split_column": "",
      "label_columns": "finding"}
  (shards,) = parse("test@array_record:/d/shards_b/")
  assert shards.name == "shards_b_test" and dict(shards.data)["path"] == "/d/shards_b/"
  # The synthetic sites still parse as before.
  assert test_sets.parse_test_sets(("b=test@B",), "synthetic")[0] == (
      test_sets.TestSet("b", "test", "B"))

  for spec, match in [
      ("x=test@nifti:/d/x", r"'x=test@nifti:/d/x'.*source 'nifti'.*medmnist, folder"),
      ("x=test@medmnist:", r"needs data.path"),
      ("x=test@medmnist:/d/x.npz;image_size=64", r"image_size cannot be set.*the run's"),
      ("x=test@medmnist:/d/x.npz;root", r"option 'root' is not key=value"),
      ("x=test@folder:/d/x.csv;split_seed=two", r"split_seed='two' is not an integer"),
      ("x=test@B", r"synthetic source only.*name=split@SOURCE:LOCATION"),
      ("x=@medmnist:/d/x.npz", r"has no split; expected 'split', 'name=split'"),
  ]:
    with pytest.raises(ValueError, match=match):
      parse(spec)


def test_missing_file_of_another_dataset_fails_before_a_workdir_is_made(tmp_path):
  config = run_config(str(tmp_path / "a.npz"), ("b=test@medmnist:/nonexistent/b.npz",))
  with pytest.raises(FileNotFoundError, match=r"test set 'b': /nonexistent/b.npz does not exist"):
    train_finetune.check_config(config)


def test_images_the_eval_ops_cannot_take_name_the_file_and_field(tmp_path):
  small = _write_npz(tmp_path / "small.npz", 0, size=20, test=_binary(4, 0))
  config = run_config(small, ("test",))
  config.data.eval_ops = "central_crop(28)"  # no resize: a 20 px image cannot become 28 px
  test_set = test_sets.other_dataset("", "test", {"source": "medmnist", "path": small}, "x")
  task = test_sets.Task(2, False, ["normal", "pneumonia"])
  with pytest.raises(ValueError, match=(rf"{small}: 'test_images': the run's eval ops "
                                        r".*cannot take an image of shape \(20, 20, 1\)")):
    test_sets.build_test_source(config, test_set, task)
  config.data.eval_ops = ""  # the preset's: resize, then crop
  source = test_sets.build_test_source(config, test_set, task)
  assert source.class_names == ["normal", "pneumonia"] and len(source) == 4


# ------------------------------------------------------------------------ with a finished run
def test_finetuning_scores_a_test_set_of_another_dataset(finished_run):
  results = finished_run["results"]
  assert set(results["test_sets"]) == {"test", "hospital_b"}
  own, other = results["test_sets"]["test"], results["test_sets"]["hospital_b"]
  assert set(own) == {"split", "sites", "num_examples", "roc_file", "metrics"}  # as before
  assert other["data"] == {"source": "medmnist", "path": finished_run["hospital_b"]}
  assert other["num_examples"] == 20 and other["split"] == "test"
  assert {"macro_auc", "accuracy", "sensitivity", "threshold", "ece"} <= set(other["metrics"])
  with open(os.path.join(finished_run["workdir"], other["roc_file"])) as f:
    assert set(json.load(f)) == {"class_1"}  # binary: one curve, named after class 1


def _read_predictions(path):
  with open(path) as f:
    rows = list(csv.DictReader(f))
  labels = np.array([int(r["label"]) for r in rows])
  probs = np.array([[float(r["prob/class_0"]), float(r["prob/class_1"])] for r in rows])
  return [r["id"] for r in rows], labels, probs


def test_evaluate_run_command_line_equals_the_runs_own_scores_and_sklearn(finished_run, tmp_path):
  run = finished_run["results"]
  out = tmp_path / "eval_b"
  # The command line, parsed as `python -m experiments.evaluate_run` parses it (in process: a
  # subprocess would spend ~15 s importing TensorFlow).
  argv = ["evaluate_run", f"--run={finished_run['workdir']}", "--data.source=medmnist",
          f"--data.path={finished_run['hospital_b']}", "--data.split=test", f"--out={out}"]
  flag_values = flags.FlagValues()
  evaluate_run.define_flags(flag_values, argv)
  flag_values(argv)
  evaluate_run.evaluate_from_flags(flag_values)
  with open(out / "results.json") as f:
    scored = json.load(f)
  assert scored["format"] == train_finetune.RESULTS_FORMAT and scored["finished"]
  assert scored["task"] == run["task"] and scored["thresholds"] == run["thresholds"]
  assert scored["evaluated_run"]["best_step"] == run["best"]["step"]
  (entry,) = scored["test_sets"].values()
  assert list(scored["test_sets"]) == ["hospital_b_test"]
  # The same numbers as the trainer's test set of the same file.
  _assert_same_metrics(entry["metrics"], run["test_sets"]["hospital_b"]["metrics"])
  with open(out / entry["roc_file"]) as f, open(
      os.path.join(finished_run["workdir"], run["test_sets"]["hospital_b"]["roc_file"])) as g:
    _assert_same_roc_curves(json.load(f), json.load(g))

  # ... and scikit-learn's on the probabilities it reports, in the file's order.
  ids, labels, probs = _read_predictions(out / entry["predictions_file"])
  assert ids == [f"test/{i:05d}" for i in range(20)]
  np.testing.assert_array_equal(labels, np.load(finished_run["hospital_b"])["test_labels"][:, 0])
  m, threshold = entry["metrics"], run["thresholds"]["values"][0]
  assert 0.0 < m["macro_auc"] < 1.0  # a mixed ranking: the comparison below means something
  assert m["macro_auc"] == pytest.approx(sk_metrics.roc_auc_score(labels, probs[:, 1]), abs=1e-12)
  predicted = probs.argmax(1)
  assert m["accuracy"] == pytest.approx(sk_metrics.accuracy_score(labels, predicted), abs=1e-12)
  assert m["balanced_accuracy"] == pytest.approx(
      sk_metrics.balanced_accuracy_score(labels, predicted), abs=1e-12)
  called = probs[:, 1] >= threshold
  assert m["sensitivity"] == pytest.approx(sk_metrics.recall_score(labels, called), abs=1e-12)
  assert m["specificity"] == pytest.approx(
      sk_metrics.recall_score(labels, called, pos_label=0), abs=1e-12)


def test_evaluate_run_on_the_runs_own_split_equals_its_test_set(finished_run, tmp_path):
  scored = evaluate_run.evaluate_run(finished_run["workdir"], {}, split="test",
                                     out=str(tmp_path / "own"))
  _assert_same_metrics(scored["test_sets"]["test"]["metrics"],
                       finished_run["results"]["test_sets"]["test"]["metrics"])
  with pytest.raises(FileExistsError, match="already holds a results.json"):
    evaluate_run.evaluate_run(finished_run["workdir"], {}, split="test", out=str(tmp_path / "own"))


def test_evaluate_run_refuses_what_the_run_cannot_take(finished_run, tmp_path):
  workdir, folder = finished_run["workdir"], finished_run["folder"]
  evaluate = lambda path, **kw: evaluate_run.evaluate_run(
      workdir, {"source": "medmnist", "path": path}, split="test", out=str(tmp_path / "out"),
      **kw)
  rgb = _write_npz(folder / "rgb.npz", 6, channels=3, test=_binary(8, 6))
  with pytest.raises(ValueError, match=(rf"{rgb}: 'test_images' holds 3-channel images; the run "
                                        r"takes 1-channel images \(its data.num_channels\)")):
    evaluate(rgb)
  labels = _binary(8, 7)
  labels[3:5] = 3
  four_classes = _write_npz(folder / "four_classes.npz", 7, test=labels)
  with pytest.raises(ValueError, match=(rf"{four_classes}: 'test_labels' has labels \[3\] "
                                        r"\(2 of 8 records\) outside the run's classes 0..1")):
    evaluate(four_classes)
  multi_label = _write_npz(folder / "multi.npz", 8, test=np.eye(3, dtype=np.uint8)[[0, 1, 2, 0]])
  with pytest.raises(ValueError, match=rf"{multi_label}: 'test_labels' holds multi-label rows of "
                                       r"3 0/1 values; the run is multi-class over 2 classes"):
    evaluate(multi_label)
  with pytest.raises(ValueError, match=r"--data: image_size cannot be set for another dataset"):
    evaluate_run.evaluate_run(workdir, {"image_size": 64}, split="test", out=str(tmp_path / "o"))

  # A run without its results (preempted, still running, failed) is not scored.
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  with open(os.path.join(workdir, "config.json")) as f, open(unfinished / "config.json",
                                                             "w") as g:
    g.write(f.read())
  with pytest.raises(FileNotFoundError, match=r"is not finished: it has no finished "
                                              r"results.json or no best/ checkpoint"):
    evaluate_run.evaluate_run(str(unfinished), {}, split="test", out=str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_the_same_images_score_the_same_from_every_file_kind(finished_run, tmp_path):
  """Hospital B's test images as ArrayRecord shards and as PNG files + CSV score exactly as the
  .npz does (lossless PNG, same order), and a CSV label outside the classes names the column."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from data_pipelines import convert  # pylint: disable=g-import-not-at-top
  expected = finished_run["results"]["test_sets"]["hospital_b"]["metrics"]
  evaluate = lambda data, split, out: evaluate_run.evaluate_run(
      finished_run["workdir"], data, split=split, out=str(tmp_path / out))

  shards = str(tmp_path / "shards_b")
  convert.convert({"source": "medmnist", "path": finished_run["hospital_b"]}, "test", shards,
                  log=lambda *_: None)
  scored = evaluate({"source": "array_record", "path": shards}, "test", "from_shards")
  _assert_same_metrics(scored["test_sets"]["shards_b_test"]["metrics"], expected)

  npz = np.load(finished_run["hospital_b"])
  images, labels = npz["test_images"], npz["test_labels"][:, 0]
  (tmp_path / "b" / "images").mkdir(parents=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(tmp_path / "b" / "images" / f"{i}.png")
  rows = [f"images/{i}.png,{label}" for i, label in enumerate(labels)]
  (tmp_path / "b" / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
  scored = evaluate({"source": "folder", "manifest": str(tmp_path / "b" / "labels.csv")}, "all",
                    "from_folder")  # root: the manifest's folder
  _assert_same_metrics(scored["test_sets"]["labels_all"]["metrics"], expected)

  rows[5] = "images/5.png,2"
  (tmp_path / "b" / "three_classes.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
  with pytest.raises(ValueError, match=(r"three_classes.csv: column\(s\) 'label' \(data."
                                        r"label_columns\) has labels \[2\] \(1 of 20 records\)")):
    evaluate({"source": "folder", "manifest": str(tmp_path / "b" / "three_classes.csv")}, "all",
             "bad")
