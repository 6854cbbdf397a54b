"""The experiments with gs:// workdirs and inits, against the Cloud Storage emulator (`gcs` fixture
in tests/conftest.py): up-front init checks on URLs, a sweep's failures, retries, job list and
reports kept in the bucket (a stand-in trainer), the OOD study's outputs, subprocess logs
uploaded from a local temporary file (a stand-in interpreter: no training), and the suite's
in-process real sweep: two `:smoke` fine-tuning runs whose workdir and REMEDIS init are in the
bucket, its results table and aggregate checked against what each run wrote, read back by the
convergence and robustness reports, then rerun without rewriting anything (slow).

Every test works from an empty current folder and checks that no local "gs:" folder appeared
there or in the repository (where sweep subprocesses start): a URL turned into a local path
would land in one of them.
"""

import csv
import io
import os
import stat
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from experiments import convergence_report as convergence
from configs.sweeps import common as sweep_configs
from experiments import label_fraction_sweep as sweep
from experiments import sweep_plan
from experiments import sweep_run
from experiments import ood_study
from experiments import robustness_report as robustness
from experiments import segmentation_study
from experiments import sweep_results
from data_pipelines import storage
from remedis_jax import export, models, train_finetune, train_segment, writers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _local_gs_folders(*roots) -> list[str]:
  """Folders named like a mangled URL ('gs:'), anywhere under `roots`."""
  found = []
  for root in roots:
    for folder, names, _ in os.walk(root):
      names[:] = [n for n in names if n not in (".git", ".venv", "workdirs")]
      found += [os.path.join(folder, n) for n in names if n.startswith("gs:")]
  return found


@pytest.fixture
def bucket(gcs, tmp_path, monkeypatch):
  """A fresh bucket URL; the test runs in an empty folder, checked for a local "gs:" after."""
  monkeypatch.chdir(tmp_path)
  yield gcs.bucket()
  assert not _local_gs_folders(tmp_path, sweep_plan.REPO_ROOT)


def smoke_sweep(inits, fractions=(0.5,), seeds=(0,), baseline_fraction=0.5, overrides=None):
  config = sweep_configs.default_sweep_config()
  config.base = "configs/finetune.py:smoke"
  config.inits = ml_collections.ConfigDict(dict(inits))
  config.label_fractions = tuple(fractions)
  config.seeds = tuple(seeds)
  config.baseline_fraction = baseline_fraction
  config.overrides = ml_collections.ConfigDict(
      overrides or {"robustness": {"perturbations": ()}, "test_sets": ("in_distribution=test@A",)})
  return config


def write_fake_export(url):
  """An export folder that passes the cheap init check (model.json only, no weights)."""
  storage.write_json(storage.join(url, "model.json"), {"model_name": "R_micro"})
  return url


def fake_results(aucs, **extra):
  """A results.json in the train_finetune schema; aucs = {test set: macro AUC}."""
  return dict({"format": train_finetune.RESULTS_FORMAT, "finished": True, "steps": 4,
               "num_train_labels": 10, "wall_time_s": 1.0, "best": {"step": 4, "value": 0.5},
               "test_sets": {name: {"metrics": {"macro_auc": auc, "accuracy": 0.5,
                                                "balanced_accuracy": 0.5, "ece": 0.1}}
                             for name, auc in aucs.items()}}, **extra)


class BucketTrainer:
  """Stands in for train_finetune.train_and_evaluate: writes results.json with the storage
  layer; a run whose init path contains 'broken' raises."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    self.calls.append(workdir)
    assert storage.is_url(workdir), workdir  # the run folder reaches the trainer as a URL
    if "broken" in config.model.init:
      raise ValueError("weights do not fit the model")
    auc = (0.9 if config.model.init else 0.7) - 0.1 * (1 - config.label_fraction)
    results = fake_results({name.partition("=")[0]: auc + 0.001 * config.seed
                            for name in config.test_sets})
    storage.write_json(storage.join(workdir, "results.json"), results)
    return results


# --------------------------------------------------------------------------- up-front checks
def test_gs_inits_are_checked_before_anything_is_written(bucket, monkeypatch):
  def no_training(*args):
    raise AssertionError("a bad sweep config reached training")
  monkeypatch.setattr(train_finetune, "train_and_evaluate", no_training)
  export_url = write_fake_export(f"{bucket}/exports/remedis")
  pretrain = f"{bucket}/pretrain"
  storage.write_text(f"{pretrain}/checkpoints/300/_METADATA", "{}")
  storage.write_bytes(f"{bucket}/weights/BiT-M-R50x1.npz", b"PK")  # exists: not loaded here
  no_checkpoint = f"{bucket}/not_a_run"
  storage.write_text(f"{no_checkpoint}/notes.txt", "no checkpoints here")
  storage.write_text(f"{bucket}/folder.npz/x", "a folder named like weights")
  good = smoke_sweep({"scratch": "", "remedis": export_url, "simclr": pretrain,
                      "bit": f"{bucket}/weights/BiT-M-R50x1.npz"})
  runs = sweep_plan.validate(good, check_runs=False)
  assert {r.init: r.init_path for r in runs} == {  # URLs are kept as they are
      "scratch": "", "remedis": export_url, "simclr": pretrain,
      "bit": f"{bucket}/weights/BiT-M-R50x1.npz"}

  workdir = f"{bucket}/sweep"
  for path, match in ((f"{bucket}/missing_export", "does not exist; fix --config.inits.remedis"),
                      (no_checkpoint, "holds no checkpoint"),
                      (f"{bucket}/folder.npz", "is not a file")):
    config = smoke_sweep({"scratch": "", "remedis": path})
    with pytest.raises(FileNotFoundError, match=f"inits.remedis='{path}' .*{match}"):
      sweep.run_sweep(config, workdir, verbose=False)
  assert not storage.exists(workdir)


# ------------------------------------------------------------ sweep bookkeeping in a bucket
def test_sweep_failures_retries_job_list_and_reports_in_a_bucket(bucket, monkeypatch):
  trainer = BucketTrainer()
  monkeypatch.setattr(train_finetune, "train_and_evaluate", trainer)
  config = smoke_sweep({"scratch": "", "remedis": write_fake_export(f"{bucket}/good"),
                        "other": write_fake_export(f"{bucket}/broken")},
                       fractions=(0.25, 0.5), seeds=(0, 1))
  workdir = f"{bucket}/sweep"
  summary = sweep.run_sweep(config, workdir, verbose=False)
  assert summary["workdir"] == workdir and len(trainer.calls) == 12
  assert sorted(trainer.calls) == sorted(f"{workdir}/{r.run_id}"
                                         for r in sweep_plan.plan_runs(config))
  assert summary["counts"] == {"finished": 8, "failed": 4}
  error_file = f"{workdir}/init=other/frac=0.5/seed=1/{sweep_run.ERROR_FILE}"
  assert "ValueError: weights do not fit the model" in storage.read_text(error_file)
  for key, name in (("results_csv", "results.csv"), ("results_json", "results.json"),
                    ("plot", "data_efficiency.png"), ("table_file", "summary.md")):
    assert summary[key] == f"{workdir}/{name}"
  rows = list(csv.DictReader(io.StringIO(storage.read_text(summary["results_csv"]))))
  assert len(rows) == 8 + 4 and sum(r["status"] == "failed" for r in rows) == 4
  assert {r["run_dir"] for r in rows} == {f"{workdir}/{r.run_id}"
                                          for r in sweep_plan.plan_runs(config)}
  stored = storage.read_json(summary["results_json"])
  assert stored["format"] == sweep_results.FORMAT and stored["num_failed_runs"] == 4
  assert storage.read_bytes(summary["plot"]).startswith(PNG_MAGIC)
  assert storage.read_text(summary["table_file"]) == summary["table"] + "\n"
  plan = storage.read_json(f"{workdir}/{sweep_plan.PLAN_FILE}")
  assert [r["run_id"] for r in plan["runs"]] == [r.run_id for r in sweep_plan.plan_runs(config)]

  # The failed runs are retried, the finished ones skipped; a run that then finishes loses its
  # error file.
  trainer.calls.clear()
  config.inits.other = write_fake_export(f"{bucket}/fixed")
  again = sweep.run_sweep(config, workdir, verbose=False)
  assert sorted(trainer.calls) == sorted(f"{workdir}/{r}" for r in summary["failed"])
  assert again["counts"] == {"skipped": 8, "finished": 4}
  assert not storage.exists(error_file)

  # Aggregate-only reads every run's status back from the bucket.
  failed_run = next(r for r in sweep_plan.plan_runs(config) if r.init == "other")
  storage.remove(f"{workdir}/{failed_run.run_id}/results.json")
  storage.write_text(f"{workdir}/{failed_run.run_id}/{sweep_run.ERROR_FILE}", "exit status 1")
  trainer.calls.clear()
  aggregated = sweep.run_sweep(config, workdir, mode="aggregate", verbose=False)
  assert not trainer.calls and aggregated["counts"] == {"finished": 11, "failed": 1}
  assert aggregated["failed"] == {failed_run.run_id: "exit status 1"}
  assert sweep_run.run_status(workdir, failed_run) == "failed"

  # Without the plan, the run folders in the bucket are found one level at a time.
  storage.remove(f"{workdir}/{sweep_plan.PLAN_FILE}")
  sweep_config, listed = sweep_plan.list_runs(workdir)
  assert sweep_config == {} and sorted(r.run_id for r in listed) == sorted(
      r.run_id for r in sweep_plan.plan_runs(config))
  with pytest.raises(FileNotFoundError, match=f"sweep folder {bucket}/nothing does not exist"):
    sweep_plan.list_runs(f"{bucket}/nothing")

  # The job list lives in the bucket and hands every run its URL unchanged; the default
  # compilation cache is WORKDIR/.jax_cache there too.
  jobs = sweep.run_sweep(config, workdir, mode="joblist", verbose=False)
  assert jobs["jobs_file"] == f"{workdir}/{sweep_run.JOBS_FILE}"
  (line,) = storage.read_text(jobs["jobs_file"]).splitlines()  # only the failed run is left
  assert f"--workdir={workdir}/{failed_run.run_id} " in line
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert sweep_run.compilation_cache_dir(workdir) == f"{workdir}/.jax_cache"
  assert "gcloud storage cat " + jobs["jobs_file"] in sweep_run.slurm_hint(
      jobs["jobs_file"], 1, "configs/sweeps/tiny.py", workdir)


def test_ood_study_outputs_in_a_bucket(bucket, monkeypatch):
  trainer = BucketTrainer()
  monkeypatch.setattr(train_finetune, "train_and_evaluate", trainer)
  config = ood_study.default_ood_config()
  config.base = "configs/finetune.py:smoke"
  config.inits = ml_collections.ConfigDict({"scratch": "",
                                            "remedis": write_fake_export(f"{bucket}/export")})
  config.label_fractions = (0.5, 1.0)
  config.seeds = (0,)
  config.overrides = ml_collections.ConfigDict({"robustness": {"perturbations": ()}})
  workdir = f"{bucket}/ood"
  summary = ood_study.run_ood_study(config, workdir, verbose=False)
  assert len(trainer.calls) == 2 + 4 and not summary["failed"]
  assert all(c.startswith(f"{workdir}/step1_site_A/") for c in trainer.calls[:2])
  assert all(c.startswith(f"{workdir}/step2_site_B/") for c in trainer.calls[2:])
  assert summary["headline"].startswith("**remedis matches")
  rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{workdir}/ood_results.csv"))))
  assert len(rows) == 2 * 3 + 4 and {r["step"] for r in rows} == {"1_site_A", "2_site_B"}
  assert storage.read_json(f"{workdir}/ood_results.json")["headline"] == summary["headline"]
  assert storage.read_bytes(f"{workdir}/ood.png").startswith(PNG_MAGIC)
  assert storage.read_text(f"{workdir}/ood_summary.md") == summary["table"] + "\n"


def test_segmentation_study_outputs_in_a_bucket(bucket, monkeypatch):
  calls = []

  def fake_segment(config, workdir):
    calls.append((config.model.init, workdir))
    results = {"finished": True, "steps": 4, "num_train_masks": 8,
               "best": {"step": 4, "value": 0.5},
               "test_sets": {t: {"metrics": {"dice": 0.6, "iou": 0.4, "dice_global": 0.6,
                                             "iou_global": 0.4}}
                             for t in (segmentation_study.IN_DISTRIBUTION, "site_B")}}
    storage.write_json(storage.join(workdir, "results.json"), results)
    return results

  monkeypatch.setattr(train_segment, "train_and_evaluate", fake_segment)
  gmml = f"{bucket}/gmml"
  storage.write_text(f"{gmml}/checkpoints/2/_METADATA", "{}")
  workdir = f"{bucket}/segmentation"
  summary = segmentation_study.run_study(workdir, gmml_init=gmml, fractions=(0.5,), seeds=(0,),
                                         steps=4)
  assert calls == [("", f"{workdir}/init=scratch/frac=0.5/seed=0"),
                   (gmml, f"{workdir}/init=gmml/frac=0.5/seed=0")]
  assert not summary["failed"]
  rows = list(csv.DictReader(io.StringIO(
      storage.read_text(f"{workdir}/{segmentation_study.CSV_FILE}"))))
  assert len(rows) == 2 * 2 and {r["init"] for r in rows} == {"scratch", "gmml"}
  assert storage.read_json(f"{workdir}/{segmentation_study.JSON_FILE}")["study"]["inits"] == {
      "scratch": "", "gmml": gmml}
  assert storage.read_bytes(f"{workdir}/{segmentation_study.PLOT_FILE}").startswith(PNG_MAGIC)
  assert storage.read_text(f"{workdir}/{segmentation_study.TABLE_FILE}") == summary["table"] + "\n"


# ------------------------------------------------------------------- subprocess logs (cheap)
# Stands in for `python -m remedis_jax.main ...`: logs to stdout and stderr, waits until the sweep
# has uploaded its first line to the bucket (so a running run's log is visible there), then
# fails (FAKE_FAIL_SEED) or writes a finished results.json. Starts in well under a second.
FAKE_PYTHON = r"""#!{python}
import os, sys, time
from data_pipelines import storage
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
workdir, seed = flags["workdir"], flags["config.seed"]
token = f"attempt {{os.getpid()}} of {{workdir}}"
print(token, flush=True)
print("a warning on stderr", file=sys.stderr, flush=True)
deadline = time.time() + 20
while token not in (storage.read_text(workdir + "/log.txt")
                    if storage.exists(workdir + "/log.txt") else ""):
  if time.time() > deadline:
    sys.exit("log.txt was not uploaded while the run was running")
  time.sleep(0.1)
if seed == os.environ.get("FAKE_FAIL_SEED"):
  print("Traceback: the run broke", flush=True)
  sys.exit(3)
storage.write_json(workdir + "/results.json", {{"finished": True, "argv": sys.argv[1:],
    "test_sets": {{"in_distribution": {{"metrics": {{"macro_auc": 0.7}}}}}}}})
"""


def test_subprocess_logs_are_uploaded_to_a_bucket_workdir(bucket, tmp_path, monkeypatch):
  python = tmp_path / "fake_python"
  python.write_text(FAKE_PYTHON.format(python=sys.executable))
  python.chmod(python.stat().st_mode | stat.S_IEXEC)
  local_tmp = tmp_path / "tmp"
  local_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(local_tmp))  # where the local logs go
  local_logs = lambda: [n for n in os.listdir(local_tmp) if n.startswith("remedis_sweep_log_")]
  monkeypatch.setattr(sweep_run, "LOG_UPLOAD_INTERVAL_S", 0.0)  # upload at every poll
  monkeypatch.setenv("FAKE_FAIL_SEED", "1")
  config = smoke_sweep({"scratch": ""}, seeds=(0, 1))
  workdir = f"{bucket}/sweep"
  summary = sweep.run_sweep(config, workdir, parallel=2, python=str(python), verbose=False)
  assert summary["counts"] == {"finished": 1, "failed": 1}, summary["failed"]
  run0, run1 = (f"{workdir}/init=scratch/frac=0.5/seed={s}" for s in (0, 1))
  # The subprocess got the run's URL, not a local path made from it.
  assert f"--workdir={run0}" in storage.read_json(f"{run0}/results.json")["argv"]
  log0 = storage.read_text(f"{run0}/{sweep_run.LOG_FILE}")
  assert f"of {run0}\n" in log0 and "a warning on stderr" in log0
  error = storage.read_text(f"{run1}/{sweep_run.ERROR_FILE}")
  assert error.startswith("exit status 3; last lines of log.txt:")
  assert "Traceback: the run broke" in error
  assert summary["failed"]["init=scratch/frac=0.5/seed=1"] == error.strip()
  assert not local_logs()  # the local copies are gone once uploaded

  # The retry appends to the failed attempt's log; the error file goes once it finishes.
  monkeypatch.delenv("FAKE_FAIL_SEED")
  again = sweep.run_sweep(config, workdir, parallel=2, python=str(python), verbose=False)
  assert again["counts"] == {"skipped": 1, "finished": 1}
  log1 = storage.read_text(f"{run1}/{sweep_run.LOG_FILE}")
  assert log1.count(f"of {run1}\n") == 2 and log1.index("the run broke") < log1.rindex("attempt")
  assert not storage.exists(f"{run1}/{sweep_run.ERROR_FILE}")
  assert not local_logs()


def test_compilation_cache_in_a_bucket_turns_on_after_a_first_compilation(bucket):
  """In a fresh process (JAX's cache settings are per process): a program compiled before
  `compilation_cache.enable` (the quickstart's pretraining) must not keep the cache off, and a
  gs:// cache dir works (JAX writes it through etils.epath)."""
  script = ("import jax, jax.numpy as jnp\n"
            "from remedis_jax import compilation_cache\n"
            "jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()\n"
            f"compilation_cache.enable('{bucket}/sweep/.jax_cache', 0.0)\n"
            "jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(5)).block_until_ready()\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["PYTHONPATH"] = sweep_plan.REPO_ROOT
  subprocess.run([sys.executable, "-c", script], env=env, cwd=sweep_plan.REPO_ROOT, check=True,
                 timeout=300)
  cached = storage.listdir(f"{bucket}/sweep/.jax_cache")
  assert any(name.startswith("jit__lambda") for name in cached), cached


# ------------------------------------------------------------------ real runs in a bucket
@pytest.mark.slow
def test_real_sweep_in_a_bucket_then_both_reports(bucket, tmp_path):
  """2 real `configs/finetune.py:smoke` runs (scratch, and REMEDIS from an export in the
  bucket) in this process, workdir in the bucket; then the reports read them back."""
  model = models.create_contrastive_model("R_micro", head_hidden_dims=(32,), projection_dim=16)
  params = jax.device_get(jax.jit(model.init)(jax.random.key(7),
                                              jnp.zeros((1, 32, 32, 3)))["params"])
  remedis = f"{bucket}/export"
  export.write_export(remedis, {"encoder": params["encoder"], "head": params["head"]},
                      {"model_name": "R_micro", "encoder_overrides": {}, "step": 0})
  config = smoke_sweep({"scratch": "", "remedis": remedis}, overrides={
      "robustness": {"perturbations": ("gamma(1.5)",)},
      "test_sets": ("in_distribution=test@A", "site_C=test@C"),
      "checkpoint_every_steps": 4,
      "mesh": {"devices": 1}})  # one device: fine-tuning on 8 runs in test_gcs.py
  workdir = f"{bucket}/sweep"
  summary = sweep.run_sweep(config, workdir, verbose=False)
  assert summary["counts"] == {"finished": 2} and not summary["failed"], summary["failed"]
  reader = csv.DictReader(io.StringIO(storage.read_text(f"{workdir}/results.csv")))
  rows = list(reader)
  assert tuple(reader.fieldnames) == sweep_results.COLUMNS
  assert sorted((r["init"], r["test_set"]) for r in rows) == [  # runs x test sets
      ("remedis", "in_distribution"), ("remedis", "site_C"),
      ("scratch", "in_distribution"), ("scratch", "site_C")]
  for row in rows:  # every row is exactly what its run wrote into the bucket
    results = storage.read_json(f"{row['run_dir']}/results.json")
    assert row["run_dir"].startswith(f"{workdir}/init=")
    assert results["config"]["label_fraction"] == float(row["label_fraction"]) == 0.5
    assert results["config"]["seed"] == results["config"]["label_fraction_seed"] == 0
    assert (results["initialisation"] == "scratch") == (row["init"] == "scratch")
    metrics = results["test_sets"][row["test_set"]]["metrics"]
    assert float(row["auc"]) == metrics["macro_auc"]
    assert float(row["accuracy"]) == metrics["accuracy"]
    assert int(row["num_train_labels"]) == results["num_train_labels"] == 51
  aggregated = storage.read_json(f"{workdir}/results.json")
  assert aggregated["format"] == sweep_results.FORMAT and len(aggregated["rows"]) == 4
  # cells: inits x fractions x test sets; matches: inits x test sets
  assert len(aggregated["cells"]) == 2 * 1 * 2 and len(aggregated["matches"]) == 2 * 2
  assert storage.read_bytes(f"{workdir}/data_efficiency.png").startswith(PNG_MAGIC)
  assert storage.read_text(f"{workdir}/summary.md").startswith("## Smallest label fraction")
  # Each run's TensorBoard event file is in its folder in the bucket.
  for row in rows:
    assert any(n.startswith(writers.EVENT_FILE_PREFIX) for n in storage.listdir(row["run_dir"]))

  report = convergence.convergence_report(workdir, verbose=False)
  assert report["json"] == f"{workdir}/convergence.json"
  for run in report["runs"]:
    assert run["num_validations"] == 2 and run["last_step"] == 4  # steps 2 and 4
    best = storage.read_json(f"{run['run_dir']}/results.json")["best"]["value"]
    assert run["best_val"] == pytest.approx(best, abs=1e-6)
  assert storage.read_json(report["json"])["counts"] == {"finished": 2}
  assert storage.read_bytes(f"{workdir}/convergence.png").startswith(PNG_MAGIC)
  assert len(storage.read_text(f"{workdir}/convergence_runs.csv").splitlines()) == 1 + 2

  report = robustness.robustness_report(workdir, output_dir=f"{bucket}/reports", verbose=False)
  assert [c["perturbation"] for c in report["cells"]] == ["gamma(1.5)"] * 2
  for row in report["rows"]:
    results = storage.read_json(f"{row['run_dir']}/results.json")
    assert row["perturbed"] == results["robustness"]["in_distribution"]["gamma(1.5)"][
        "macro_auc"]
  assert storage.read_text(f"{bucket}/reports/robustness.md") == report["table"] + "\n"
  assert storage.read_json(f"{bucket}/reports/robustness.json")["workdir"] == workdir

  # Everything finished: the rerun runs and rewrites nothing.
  def run_files():
    return {f"{run_dir}/{name}": storage.read_bytes(f"{run_dir}/{name}")
            for run_dir in sorted({r["run_dir"] for r in rows})
            for name in storage.listdir(run_dir) if storage.isfile(f"{run_dir}/{name}")}
  before = run_files()
  assert sum(path.endswith("/results.json") for path in before) == 2
  again = sweep.run_sweep(config, workdir, verbose=False)
  assert again["counts"] == {"skipped": 2} and again["matches"] == summary["matches"]
  assert run_files() == before
