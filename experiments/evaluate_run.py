r"""Scores a finished fine-tuning run on any dataset: another hospital's, or a split of its own.

  python -m experiments.evaluate_run --run=WORKDIR --data.source=medmnist \
    --data.path=FILE.npz --data.split=test --out=DIR

`--data.<key>` names the dataset as a config's data block would (keys in
test_sets.OTHER_DATASET_KEYS, plus `source` and `split`); a key not given is the run's own,
so `--data.split=val` alone scores the run's validation split, and
`--data.source=folder --data.manifest=/d/x/labels.csv --data.split_column= --data.split=all`
every row of another hospital's CSV. The images are read as the run reads its own: its image
size, channels and eval ops (config.json). Before the model runs, the dataset is checked
against the run (test_sets.check_other_dataset): labels outside the run's classes, colour
images for a one-channel run, or images its eval ops cannot bring to its input size are errors
naming the file and the field. A run without results.json (preempted, still running, failed)
is an error, not a half evaluation.

The run's best checkpoint (WORKDIR/best/) is scored with the trainer's own code
(train_finetune.score_test_set) at the operating thresholds the run chose on its validation
split, so the metrics equal those of a test set named in the run's config. Written to --out
(refused if it already holds results):

  results.json          the run's results.json schema ("remedis-jax-finetune-results/1": config,
                        task, best, thresholds, val are the run's), with `test_sets` holding
                        this dataset only (named --name, default "<file name>_<split>"),
                        `robustness` {}, `wall_time_s` this evaluation's, and
                        `evaluated_run` {workdir, best_step}
  roc/<name>.json       ROC points per class, as the trainer writes them
  predictions/<name>.csv  one row per scored record: id, label (label/<class> for multi-label),
                        prob/<class>
"""

from __future__ import annotations

import csv
import io
import time
from typing import Any, Mapping, NamedTuple

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import sources as data_sources
from data_pipelines import storage
from remedis_jax import checkpointing, distillation, export, models, sharding
from remedis_jax import supervised, test_sets, train_finetune
from remedis_jax.evaluators import classification
from remedis_jax.train_state import put_host_tree

PREDICTIONS_DIR = "predictions"


class FinishedRun(NamedTuple):
  workdir: str
  config: ml_collections.ConfigDict  # the run's config.json
  results: dict[str, Any]            # its results.json


def read_finished_run(workdir: str) -> FinishedRun:
  """The config and results of a finished fine-tuning run (its checkpoint is read later).

  Raises:
    FileNotFoundError: no such run, no config.json, no results.json or best/ (unfinished).
    ValueError: a run of another trainer, or results of another format.
  """
  workdir = storage.absolute(workdir)
  config_path = storage.join(workdir, export.RUN_CONFIG_FILE)
  if not storage.isfile(config_path):
    raise FileNotFoundError(f"--run={workdir} has no {export.RUN_CONFIG_FILE}: it is not a "
                            "fine-tuning workdir")
  config = ml_collections.ConfigDict(storage.read_json(config_path))
  if config.get("trainer") != "finetune":
    raise ValueError(f"--run={workdir} is a {config.get('trainer')!r} run; only fine-tuning runs "
                     "(configs/finetune.py) can be scored")
  results = supervised.read_results(workdir)
  if results is None or not storage.isdir(storage.join(workdir, supervised.BEST_DIR)):
    raise FileNotFoundError(
        f"--run={workdir} is not finished: it has no finished {supervised.RESULTS_FILE} or no "
        f"{supervised.BEST_DIR}/ checkpoint (preempted, still running or failed); rerun its "
        "training command to finish it")
  if results.get("format") != train_finetune.RESULTS_FORMAT:
    raise ValueError(f"{workdir}/{supervised.RESULTS_FILE} has format {results.get('format')!r}; "
                     f"expected {train_finetune.RESULTS_FORMAT!r}")
  return FinishedRun(workdir, config, results)


def dataset_test_set(config: ml_collections.ConfigDict, data: Mapping[str, Any], split: str,
                     name: str = "") -> test_sets.TestSet:
  """`--data.<key>` values given (without split) -> the TestSet they name.

  Nothing given: `split` of the run's own data. Otherwise another dataset
  (test_sets.other_dataset); `source` defaults to the run's, and with it the location
  (and a folder's root) when those are not given either.

  Raises:
    ValueError: what test_sets.other_dataset refuses.
  """
  data = dict(data)
  if not data:
    return test_sets.TestSet(name or split, split)
  data.setdefault("source", config.data.source)
  location_key = test_sets.OTHER_DATASET_LOCATION.get(data["source"])
  if data["source"] == config.data.source and location_key and location_key not in data:
    data[location_key] = config.data[location_key]
    if data["source"] == "folder":
      data.setdefault("root", config.data.root)
  return test_sets.other_dataset(name, split, data, what="--data")


def _predictions_csv(ids: list[str], labels: np.ndarray, probs: np.ndarray, multi_label: bool,
                     class_names: list[str]) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  label_columns = [f"label/{c}" for c in class_names] if multi_label else ["label"]
  writer.writerow(["id"] + label_columns + [f"prob/{c}" for c in class_names])
  for i, record_id in enumerate(ids):
    label = [int(v) for v in labels[i]] if multi_label else [int(labels[i])]
    writer.writerow([record_id] + label + [repr(float(p)) for p in probs[i]])
  return out.getvalue()


def _scored_ids(source, labels: np.ndarray, batch_size: int, multi_label: bool) -> list[str]:
  """The id of every row ClassificationEvaluator.predict returned, in its order.

  Raises:
    RuntimeError: the rows' labels are not the source's (an eval-batch layout mismatch).
  """
  order = distillation.gathered_indices(len(source), batch_size // jax.process_count(),
                                        jax.process_count()).ravel()
  order = order[order >= 0]
  source_labels = np.asarray(source.labels)[order]
  labeled = np.all(source_labels >= 0, axis=1) if multi_label else source_labels >= 0
  if not np.array_equal(source_labels[labeled], labels):
    raise RuntimeError("the scored rows do not line up with the dataset's records")
  ids = np.asarray(source.ids, dtype=object)[order][labeled]
  return [str(i) for i in ids]


def evaluate_run(run: str, data: Mapping[str, Any], *, split: str, out: str,
                 name: str = "") -> dict[str, Any]:
  """Scores the best checkpoint of the fine-tuning run `run` on a dataset; writes to `out`.

  Args:
    run: the run's workdir.
    data: the `--data.<key>` values given, `split` excluded (see `dataset_test_set`).
    split: the dataset's split.
    out: folder for results.json, roc/ and predictions/ (module docstring).
    name: the test set's name ("" = "<file name>_<split>", or `split` for the run's own data).

  Returns:
    What results.json holds.

  Raises:
    FileNotFoundError / ValueError: an unfinished run, a dataset the run cannot take (naming
      the file and the field), or `out` already holding results (FileExistsError).
  """
  start_time = time.time()
  finished = read_finished_run(run)
  config, run_results = finished.config, finished.results
  test_set = dataset_test_set(config, data, split, name)
  out = storage.absolute(out)
  if storage.exists(storage.join(out, supervised.RESULTS_FILE)):
    raise FileExistsError(f"--out={out} already holds a {supervised.RESULTS_FILE}; choose a new "
                          "folder")
  task = test_sets.Task(run_results["task"]["num_classes"],
                             run_results["task"]["multi_label"],
                             list(run_results["task"]["class_names"]))

  # ---- the dataset, checked against the run before any model runs
  source = test_sets.check_eval_records(
      config, test_sets.build_test_source(config, test_set, task))

  # ---- the best checkpoint, replicated over the mesh
  mesh = sharding.make_mesh(config.get("mesh"))
  if config.eval_batch_size % mesh.size or config.eval_batch_size % jax.process_count():
    raise ValueError(f"the run's eval_batch_size={config.eval_batch_size} must be divisible by "
                     f"the number of devices ({mesh.size}) and processes")
  model = train_finetune.build_model(config, task.num_classes)
  image_shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image_shape),
                                               train=False)["params"])
  params, step = checkpointing.load_params(storage.join(finished.workdir, supervised.BEST_DIR))
  params = models.merge_params(params, abstract)  # names any key that does not fit
  params = put_host_tree(params, jax.tree.map(lambda _: sharding.replicated(mesh), params))

  # ---- scored as the trainer scores a test set, at the run's validation thresholds
  evaluator = classification.ClassificationEvaluator(
      train_finetune.make_predict_fn(model, task.multi_label), source,
      ops=supervised.eval_ops(config), batch_size=config.eval_batch_size, mesh=mesh,
      num_channels=config.data.num_channels, num_bins=config.ece_bins)
  thresholds = (run_results.get("thresholds") or {}).get("values")
  thresholds = None if thresholds is None else np.asarray(thresholds, np.float64)
  entry, labels, probs = train_finetune.score_test_set(evaluator, params, thresholds, test_set,
                                                       out)
  ids = _scored_ids(source, labels, config.eval_batch_size, task.multi_label)
  entry["predictions_file"] = storage.join(PREDICTIONS_DIR, f"{test_set.name}.csv")
  if jax.process_index() == 0:
    storage.write_text(storage.join(out, entry["predictions_file"]), _predictions_csv(
        ids, labels, probs, task.multi_label, task.class_names))

  results = dict(run_results, **{
      "wall_time_s": time.time() - start_time,
      "subset_manifest": storage.join(finished.workdir, run_results.get(
          "subset_manifest", supervised.SUBSET_MANIFEST_FILE)),
      "test_sets": {test_set.name: entry}, "robustness": {},
      "evaluated_run": {"workdir": finished.workdir, "best_step": int(step)}})
  results = storage.json_safe(results)
  supervised.write_json(storage.join(out, supervised.RESULTS_FILE), results)
  if jax.process_index() == 0:
    print(f"{finished.workdir} (best step {step}) on {test_set.name} ({entry['num_examples']} "
          f"records):\n{train_finetune.format_results(results)}\n"
          f"  results        {storage.join(out, supervised.RESULTS_FILE)}", flush=True)
  return results


# ------------------------------------------------------------------------------------ CLI
def data_flag_defaults() -> ml_collections.ConfigDict:
  """`--data.<key>`: the dataset's keys, with the data block's defaults (shown by --help; only
  the keys given on the command line are used)."""
  defaults = data_sources.default_data_config()
  return ml_collections.ConfigDict(
      {"source": "", "split": "test",
       **{key: defaults[key] for key in test_sets.OTHER_DATASET_KEYS}})


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: list[str] | None = None) -> None:
  """The command-line flags, in `flag_values` (`argv`: the command line, default sys.argv, for
  the `--data.<key>` overrides); defined when run as a script only, so that importing this
  module (the tests do) does not clash with other entry points' flags of the same name."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("run", None, "The finished fine-tuning run's workdir.",
                      flag_values=flag_values)
  config_flags.DEFINE_config_dict(
      "data", data_flag_defaults(), "The dataset to score: --data.source, --data.path (or "
      "--data.manifest / --data.tfds_name), --data.split, layout keys; a key not given is the "
      "run's.", flag_values=flag_values, sys_argv=argv)
  flags.DEFINE_string("out", None, "Folder for results.json, roc/ and predictions/ (must not "
                      "hold results yet).", flag_values=flag_values)
  flags.DEFINE_string("name", "", "The test set's name (default: <file name>_<split>).",
                      flag_values=flag_values)
  flags.mark_flags_as_required(["run", "out"], flag_values=flag_values)


def evaluate_from_flags(flag_values: flags.FlagValues) -> dict[str, Any]:
  """`evaluate_run` with the parsed flags: only the `--data.<key>` given count."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  given = config_flags.get_override_values(flag_values["data"])
  return evaluate_run(flag_values.run, {k: v for k, v in given.items() if k != "split"},
                      split=flag_values.data.split, out=flag_values.out, name=flag_values.name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  evaluate_from_flags(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  app.run(main)
