r"""A study under a declared protocol: pretraining, tuning on validation, one test round, report.

  python -m experiments.study --config=configs/studies/pneumoniamnist.py \
    --config.data_path=../shared/data/pneumoniamnist.npz --workdir=workdirs/pneumoniamnist_study \
    [--stages=pretrain,tune,select,final,distill,report] [--arms=scratch,...] [--parallel=N]

Stages, in order (each resumes and skips what is finished; `--stages` runs a subset):

  pretrain  SimCLR (`config.pretrain`) -> WORKDIR/pretrain/. Skipped when no arm needs it.
  tune      every arm with `setup_from="tune"` x every setup of `config.tune.grid`, at
            `tune.label_fractions` x `tune.seeds`, scored on the VALIDATION split only (the
            test split is not read) -> WORKDIR/tune/ (a label-fraction sweep).
  select    the selection rule: per tuned arm, the setup with the highest mean validation
            `metric` over the tuning fractions and seeds (every run must have finished; ties go
            to the earlier setup in the grid) -> WORKDIR/selection.json.
  final     every arm with its chosen setup (an untuned arm takes the setup of the arm named by
            its `setup_from`) at `final.label_fractions` x `final.seeds`, scored on the test
            split once (and, when `config.zero_shot.path` names another site's data, on its
            test split too, without any of its labels in training) -> WORKDIR/final/.
  distill   each student of `config.distill.students` (teacher arm -> its init, its chosen
            setup without class weights, `distill.epochs` over every training image, the final
            teacher run of the same fraction and seed as teacher), scored on test once ->
            WORKDIR/distill/.
  report    the final and distill rows together (and, with `config.raw_pixel_baseline`, a
            logistic regression on raw pixels at the same fractions and seeds,
            experiments/raw_pixel_baseline.py): per cell mean, std and 95% interval; the
            paired difference of every arm against `config.baseline` per seed (the same
            labeled subset) with its 95% interval; the selection table; how many times the test
            split was scored, and a check that no tuning run scored it -> WORKDIR/report/
            (summary.md, results.csv, results.json, data_efficiency.png, study.json).

Runs are `remedis_jax.main` fine-tuning runs built by experiments/label_fraction_sweep.py, so a
run folder is `<stage>/init=<arm>/frac=<f>/seed=<s>` and a run id is its path.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import ml_collections

from configs.sweeps import common as sweep_configs
from experiments import label_fraction_sweep as sweep
from experiments import sweep_plan
from experiments import sweep_run
from experiments import sweep_results
from data_pipelines import storage
from remedis_jax import run_files

STAGES = ("pretrain", "tune", "select", "final", "distill", "report")
PRETRAIN_DIR, TUNE_DIR, FINAL_DIR, DISTILL_DIR, REPORT_DIR = (
    "pretrain", "tune", "final", "distill", "report")
PRETRAIN_DONE = "pretrain_finished.json"
SELECTION_FILE = "selection.json"
STUDY_FILE = "study.json"
SEPARATOR = "__"
# An arm's init: scratch, this study's pretraining, or another study's (config.source_pretrain).
INITS = ("", "pretrain", "source_pretrain")  # tuning init names: <arm>__<setup>
VALIDATION = "validation"  # the test-set name under which tuning runs score validation
TEST = "test"


def merged(*blocks) -> dict[str, Any]:
  """Nested dicts (or ConfigDicts) merged left to right; nested blocks merge, values replace."""
  out: dict[str, Any] = {}
  for block in blocks:
    block = block.to_dict() if isinstance(block, ml_collections.ConfigDict) else dict(block)
    for key, value in block.items():
      if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
      if isinstance(value, dict) and isinstance(out.get(key), dict):
        out[key] = merged(out[key], value)
      else:
        out[key] = value
  return out


def check_config(study: ml_collections.ConfigDict) -> None:
  """Checks the study's own keys before anything runs.

  Raises:
    ValueError: naming the key and what was expected.
  """
  if not study.data_path:
    raise ValueError("study config data_path is empty; give the dataset, e.g. "
                     "--config.data_path=../shared/data/pneumoniamnist.npz")
  if not storage.exists(study.data_path):
    raise FileNotFoundError(f"study config data_path={study.data_path!r} does not exist")
  arms = dict(study.arms)
  tuned = [name for name, arm in arms.items() if arm.setup_from == "tune"]
  for name, arm in arms.items():
    if SEPARATOR in name:
      raise ValueError(f"study config arms.{name}: an arm name may not contain {SEPARATOR!r}")
    if arm.init not in INITS:
      raise ValueError(f"study config arms.{name}.init={arm.init!r}; expected '' (scratch), "
                       "'pretrain' (the study's pretraining run) or 'source_pretrain' (the "
                       "pretraining run named by config.source_pretrain)")
    if arm.init == "source_pretrain" and not study.get("source_pretrain"):
      raise ValueError(f"study config arms.{name}.init='source_pretrain' needs "
                       "config.source_pretrain: another study's pretraining workdir, e.g. "
                       "--config.source_pretrain=workdirs/pneumoniamnist_study/pretrain")
    if arm.setup_from in arms and arm.setup_from in study.tune.grid:
      raise ValueError(f"study config arms.{name}.setup_from={arm.setup_from!r} names both an "
                       "arm and a setup of tune.grid; rename one")
    if (arm.setup_from != "tune" and arm.setup_from not in tuned
        and arm.setup_from not in study.tune.grid):
      raise ValueError(f"study config arms.{name}.setup_from={arm.setup_from!r}; expected "
                       f"'tune', a tuned arm ({', '.join(tuned) or 'none'}) or a setup of "
                       f"tune.grid fixed before the study ({', '.join(study.tune.grid)})")
  for student, teacher in study.distill.students.items():
    if teacher not in arms:
      raise ValueError(f"study config distill.students.{student}={teacher!r} is not an arm "
                       f"({', '.join(arms)})")
    if student in arms:
      raise ValueError(f"study config distill.students.{student} is also an arm; rename it")
  if study.baseline not in arms:
    raise ValueError(f"study config baseline={study.baseline!r} is not an arm ({', '.join(arms)})")
  if not study.tune.grid and tuned:
    raise ValueError("study config tune.grid is empty but arms are tuned on it")
  fractions = [float(f) for f in study.final.label_fractions]
  if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
    raise ValueError(f"study config final.label_fractions={tuple(fractions)}; expected "
                     "fractions in (0, 1]")
  reference = study.final.get("baseline_fraction")
  if reference is not None and not 0.0 < float(reference) <= 1.0:
    raise ValueError(f"study config final.baseline_fraction={reference!r}; expected a "
                     "fraction in (0, 1] (or None: the largest of final.label_fractions)")


def baseline_fraction(study) -> float:
  """The fraction of the baseline arm's reference cell: `final.baseline_fraction` (run for the
  baseline arm only when no other arm has it) or, by default, the largest final fraction."""
  value = study.final.get("baseline_fraction")
  return float(value) if value is not None else max(float(f) for f in
                                                     study.final.label_fractions)


def _init_path(arm, workdir: str, study=None) -> str:
  if arm.init == "pretrain":
    return storage.join(workdir, PRETRAIN_DIR)
  if arm.init == "source_pretrain":
    return storage.absolute(study.source_pretrain)
  return ""


def _sweep_config(study, *, inits: dict[str, str], init_overrides: dict[str, dict],
                  fractions, seeds, test_sets: tuple[str, ...], baseline: str,
                  reference_fraction: float | None = None) -> ml_collections.ConfigDict:
  config = sweep_configs.default_sweep_config()
  config.base = study.base
  config.label_fractions = tuple(float(f) for f in fractions)
  config.seeds = tuple(int(s) for s in seeds)
  config.inits = ml_collections.ConfigDict(inits)
  config.init_overrides = ml_collections.ConfigDict(
      {name: block for name, block in init_overrides.items() if block})
  config.baseline = baseline
  # The baseline's reference cell; plan_runs adds it for the baseline arm alone when the grid
  # lacks it (e.g. scratch with every label beside every arm at a few percent).
  config.baseline_fraction = (max(config.label_fractions) if reference_fraction is None
                              else float(reference_fraction))
  config.metric = study.metric
  config.overrides = ml_collections.ConfigDict(merged(
      study.overrides, {"data": {"path": storage.absolute(study.data_path)},
                        "test_sets": test_sets}))
  return config


def tune_sweep(study, workdir: str, arms: tuple[str, ...] = ()
               ) -> ml_collections.ConfigDict | None:
  """Every tuned arm (of `arms`, default all) x every setup of the grid, on validation only;
  None when no arm is tuned (every setup fixed before the study)."""
  inits, overrides = {}, {}
  for arm_name, arm in study.arms.items():
    if arm.setup_from != "tune" or (arms and arm_name not in arms):
      continue
    for setup_name, setup in study.tune.grid.items():
      name = f"{arm_name}{SEPARATOR}{setup_name}"
      inits[name] = _init_path(arm, workdir, study)
      overrides[name] = merged(arm.overrides, setup)
  if not inits:
    return None
  return _sweep_config(study, inits=inits, init_overrides=overrides,
                       fractions=study.tune.label_fractions, seeds=study.tune.seeds,
                       test_sets=(f"{VALIDATION}=val",), baseline=next(iter(inits)))


def select(study, tune_rows: list[dict[str, Any]], arms: tuple[str, ...] = ()
           ) -> dict[str, Any]:
  """The selection rule (module docstring) on the tuning rows of `arms` (default: every tuned
  arm). An arm's choice depends on its own tuning runs only.

  Returns:
    {arm: {"setup", "score", "scores": {setup: {"score", "per_fraction": {f: mean}, "n"}}}}.

  Raises:
    RuntimeError: a tuning run did not finish (the rule needs every run).
  """
  column = sweep_results.METRICS.get(study.metric, study.metric)
  tuned = [name for name, arm in study.arms.items()
           if arm.setup_from == "tune" and (not arms or name in arms)]
  tune_rows = [r for r in tune_rows if r["init"].split(SEPARATOR)[0] in tuned]
  unfinished = [r["run_id"] for r in tune_rows if r["status"] != "finished"]
  if unfinished:
    raise RuntimeError(f"the selection rule needs every tuning run; {len(unfinished)} did not "
                       f"finish ({', '.join(unfinished[:5])}...): rerun --stages=tune")
  expected = len(study.tune.label_fractions) * len(study.tune.seeds)
  selection = {}
  for arm_name in tuned:
    scores = {}
    for setup_name in study.tune.grid.keys():
      name = f"{arm_name}{SEPARATOR}{setup_name}"
      rows = [r for r in tune_rows if r["init"] == name and r["test_set"] == VALIDATION]
      if len(rows) != expected:
        raise RuntimeError(f"tuning init {name}: {len(rows)} validation rows, expected "
                           f"{expected}: rerun --stages=tune")
      per_fraction = {}
      for fraction in study.tune.label_fractions:
        values = [r[column] for r in rows if math.isclose(r["label_fraction"], fraction)]
        per_fraction[f"{fraction:g}"] = float(sum(values) / len(values))
      score = float(sum(r[column] for r in rows) / len(rows))
      scores[setup_name] = {"score": score, "per_fraction": per_fraction, "n": len(rows)}
    best = max(scores, key=lambda s: (scores[s]["score"], -list(scores).index(s)))
    selection[arm_name] = {"setup": best, "score": scores[best]["score"], "scores": scores}
  for arm_name, arm in study.arms.items():  # setups fixed before the study: recorded as such
    if arm.setup_from in study.tune.grid and (not arms or arm_name in arms):
      selection[arm_name] = {"setup": arm.setup_from, "fixed": True, "scores": {}}
  return selection


def chosen_overrides(study, selection: dict[str, Any], arm_name: str) -> dict[str, Any]:
  """An arm's own keys with the setup chosen for it (or for the arm it takes its setup from)."""
  arm = study.arms[arm_name]
  if arm.setup_from in study.tune.grid:  # fixed before the study
    return merged(study.tune.grid[arm.setup_from], arm.overrides)
  source = arm_name if arm.setup_from == "tune" else arm.setup_from
  if source not in selection:
    raise RuntimeError(f"no setup chosen for arm {source!r}: run --stages=select first")
  return merged(study.tune.grid[selection[source]["setup"]], arm.overrides)


def final_test_sets(study) -> tuple[str, ...]:
  """The test split, and another site's test split scored zero-shot when the study names one."""
  zero_shot = study.get("zero_shot")
  if not zero_shot or not zero_shot.path:
    return (TEST,)
  return (TEST, f"{zero_shot.name}={zero_shot.split}@{zero_shot.source}:"
                f"{storage.absolute(zero_shot.path)}")


def final_sweep(study, workdir: str, selection: dict[str, Any],
                arms: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  names = [name for name in study.arms if not arms or name in arms]
  inits = {name: _init_path(study.arms[name], workdir, study) for name in names}
  overrides = {name: chosen_overrides(study, selection, name) for name in names}
  # With a subset of the arms the stage's own summary compares against the first of them; the
  # report compares every arm against the study's baseline.
  baseline = study.baseline if study.baseline in inits else names[0]
  return _sweep_config(study, inits=inits, init_overrides=overrides,
                       fractions=study.final.label_fractions, seeds=study.final.seeds,
                       test_sets=final_test_sets(study), baseline=baseline,
                       reference_fraction=baseline_fraction(study))


def distill_sweep(study, workdir: str, selection: dict[str, Any],
                  students: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  inits, overrides = {}, {}
  for student, teacher in study.distill.students.items():
    if students and student not in students:
      continue
    inits[student] = _init_path(study.arms[teacher], workdir, study)
    template = storage.join(storage.absolute(workdir), FINAL_DIR, f"init={teacher}",
                            "frac={label_fraction:g}/seed={label_fraction_seed}")
    # Soft targets carry the teacher's own calibration: the student's loss has no class weights.
    overrides[student] = merged(chosen_overrides(study, selection, teacher), {
        "total_epochs": float(study.distill.epochs), "distill": {"teacher": template},
        "loss": {"class_weights": ""}})
  first = next(iter(inits))
  return _sweep_config(study, inits=inits, init_overrides=overrides,
                       fractions=study.final.label_fractions, seeds=study.final.seeds,
                       test_sets=final_test_sets(study), baseline=first)


# ------------------------------------------------------------------------------ the stages
def pretrain_overrides(study) -> dict[str, Any]:
  """The pretraining config's dotted overrides: `pretrain.overrides` on the study's data.

  "{source_data_path}" in a value (e.g. the split "train+train@medmnist:{source_data_path}")
  becomes config.source_data_path: the in-distribution dataset whose images join pretraining.
  """
  overrides = sweep_plan.flatten(merged(study.pretrain.overrides,
                                   {"data": {"path": storage.absolute(study.data_path)}}))
  for key, value in overrides.items():
    if isinstance(value, str) and "{source_data_path}" in value:
      if not study.get("source_data_path"):
        raise ValueError(f"study config pretrain.overrides.{key}={value!r} needs "
                         "config.source_data_path (e.g. the in-distribution .npz)")
      overrides[key] = value.replace("{source_data_path}",
                                     storage.absolute(study.source_data_path))
  return overrides


def run_pretraining(study, workdir: str, log) -> str:
  """SimCLR into WORKDIR/pretrain, in this process (the trainer resumes a partial run)."""
  import importlib  # pylint: disable=g-import-not-at-top
  path = storage.join(workdir, PRETRAIN_DIR)
  done = storage.join(workdir, PRETRAIN_DONE)
  if storage.exists(done):
    log(f"[pretrain] finished earlier: {path}")
    return path
  overrides = pretrain_overrides(study)
  config = sweep_plan.apply_overrides(sweep_plan.load_config_file(study.pretrain.config),
                                 overrides.items(), where="pretrain.overrides")
  log(f"[pretrain] {study.pretrain.config} with {overrides} -> {path}")
  start = time.time()
  # remedis_jax.main.TRAINERS: config.trainer NAME is the module remedis_jax.train_NAME.
  trainer = importlib.import_module(f"remedis_jax.train_{config.trainer}")
  result = trainer.train_and_evaluate(config, path)
  if result.get("preempted"):
    raise InterruptedError("pretraining was preempted and saved; rerun to resume")
  storage.write_json(done, {"config": study.pretrain.config, "overrides": overrides,
                            "wall_time_s": time.time() - start})
  return path


def _run(sweep_config, path: str, parallel: int, title: str, log) -> dict[str, Any]:
  summary = sweep.run_sweep(sweep_config, path, parallel=parallel, title=title,
                            verbose=True)
  if summary.get("failed"):
    raise RuntimeError(f"{len(summary['failed'])} run(s) failed in {path}: "
                       f"{', '.join(summary['failed'])}; rerun the same command to retry them")
  if summary.get("counts", {}).get("interrupted"):
    raise InterruptedError(f"a run in {path} was preempted and saved; rerun to resume")
  return summary


def _rows(sweep_config, path: str) -> list[dict[str, Any]]:
  if sweep_config is None:
    return []
  return sweep_results.collect_rows(path, sweep_plan.plan_runs(sweep_config))


def read_selection(workdir: str) -> dict[str, Any]:
  path = storage.join(workdir, SELECTION_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run --stages=tune,select first")
  return storage.read_json(path)


def test_reads(rows: list[dict[str, Any]], test_set: str = TEST) -> int:
  """How many runs scored `test_set` (one finished row per run and test set)."""
  return sum(1 for r in rows if r["status"] == "finished" and r["test_set"] == test_set)


def selection_table(selection: dict[str, Any], metric: str) -> str:
  lines = []
  for arm, chosen in selection.items():
    if chosen.get("fixed"):
      lines += [f"**{arm}**: `{chosen['setup']}`, fixed before the study (not tuned here)", ""]
      continue
    fractions = list(next(iter(chosen["scores"].values()))["per_fraction"])
    lines += [f"**{arm}** (chosen: `{chosen['setup']}`)", "",
              "| setup | mean validation " + metric + " | "
              + " | ".join(f"{float(f):.0%}" for f in fractions) + " |",
              "|---|---|" + "---|" * len(fractions)]
    for setup, score in sorted(chosen["scores"].items(), key=lambda kv: -kv[1]["score"]):
      mark = " (chosen)" if setup == chosen["setup"] else ""
      lines.append(f"| {setup}{mark} | {score['score']:.4f} | "
                   + " | ".join(f"{score['per_fraction'][f]:.4f}" for f in fractions) + " |")
    lines.append("")
  return "\n".join(lines)


def headline_arm(study, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  """Of `config.headline_candidates`, the arm with the highest mean best-validation value over
  its finished final runs (the value each run chose its checkpoint by); None without any."""
  means = {}
  for arm in study.get("headline_candidates", ()):
    values = [r["best_val"] for r in rows
              if r["init"] == arm and r["status"] == "finished" and r["test_set"] == TEST]
    if values:
      means[arm] = float(sum(values) / len(values))
  if not means:
    return None
  best = max(means, key=lambda a: (means[a], -list(means).index(a)))
  return {"arm": best, "mean_best_validation": means}


def headline_table(study, cells, paired, arms, test_set: str = TEST) -> str:
  """Markdown, arm x fraction: mean [95% CI] (n) of `test_set`, and for every arm but the
  baseline the paired difference against it per seed: mean [95% CI] (n pairs)."""
  column = sweep_results.METRICS.get(study.metric, study.metric)
  fractions = sorted({float(c["label_fraction"]) for c in cells if c["test_set"] == test_set})

  def interval(mean, low, high, n):
    if not math.isfinite(mean):
      return "-"
    ci = f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) else ""
    return f"{mean:.3f}{ci} ({n})"

  lines = [f"| {test_set} {sweep_results.METRIC_LABELS.get(column, column)} | "
           + " | ".join(f"{f:.0%}" for f in fractions) + " |",
           "|---|" + "---|" * len(fractions)]
  for arm in arms:
    entries = []
    for f in fractions:
      cell = sweep_results.find_cell(cells, arm, f, test_set)
      text = ("not run" if cell is None else
              interval(cell[f"{column}_mean"], cell[f"{column}_ci_low"],
                       cell[f"{column}_ci_high"], cell["n"]))
      pair = next((p for p in paired if p["init"] == arm and p["test_set"] == test_set
                   and math.isclose(p["label_fraction"], f)), None)
      if pair is not None and pair["n"]:
        ci = (f" [{pair['ci_low']:+.3f}, {pair['ci_high']:+.3f}]"
              if math.isfinite(pair["ci_low"]) else "")
        text += f"; {pair['mean']:+.3f}{ci} ({pair['n']})"
      entries.append(text)
    lines.append(f"| {arm} | " + " | ".join(entries) + " |")
  return "\n".join(lines)


def report(study, workdir: str, selection: dict[str, Any], log) -> dict[str, Any]:
  """WORKDIR/report: the final and distill rows together, the selection, the test reads."""
  tune_rows = _rows(tune_sweep(study, workdir), storage.join(workdir, TUNE_DIR))
  read_test = [r["run_id"] for r in tune_rows if r["status"] == "finished"
               and r["test_set"] != VALIDATION]
  if read_test:
    raise RuntimeError(f"tuning runs scored the test split ({', '.join(read_test[:3])}); the "
                       "protocol is broken: start a new study")
  final = final_sweep(study, workdir, selection)
  rows = _rows(final, storage.join(workdir, FINAL_DIR))
  arms = list(study.arms.keys())
  if study.distill.students:
    distill = distill_sweep(study, workdir, selection)
    rows += _rows(distill, storage.join(workdir, DISTILL_DIR))
    arms += list(study.distill.students.keys())
  path = storage.join(workdir, REPORT_DIR)
  storage.makedirs(path)
  reads, num_arms = test_reads(rows), len(arms)
  raw_note = ""
  if study.get("raw_pixel_baseline"):
    from experiments import raw_pixel_baseline  # pylint: disable=g-import-not-at-top
    log("[report] the raw-pixel logistic regression at the final fractions and seeds")
    rows += raw_pixel_baseline.run(
        study.data_path, label_fractions=tuple(sorted(
            {float(f) for f in study.final.label_fractions} | {baseline_fraction(study)})),
        seeds=study.final.seeds, log=log)
    arms.append(raw_pixel_baseline.INIT)
    raw_note = (f" The raw-pixel baseline (C chosen on validation) scored it "
                f"{test_reads(rows) - reads} more times.")
  zero_shot = study.get("zero_shot")
  zero_shot_note = ""
  if zero_shot and zero_shot.path:
    zero_shot_note = (f" The same runs scored {zero_shot.name} ({zero_shot.split} split of "
                      f"{zero_shot.path}) zero-shot {test_reads(rows, zero_shot.name)} times.")
  outputs = sweep_results.write_outputs(
      rows, path, metric=study.metric, baseline=study.baseline,
      baseline_fraction=baseline_fraction(study), tolerance=0.0,
      inits=arms, title=study.name, sweep_config=study.to_dict())
  headline = headline_arm(study, rows)
  headline_note = ""
  if headline:
    headline_note = ("\n\nHeadline arm, chosen on validation: **" + headline["arm"] + "** (mean "
                     "best validation " + ", ".join(f"{a} {v:.4f}" for a, v in
                                                   headline["mean_best_validation"].items())
                     + ").")
  planned = (f"{num_arms} arms x {len(study.final.label_fractions)} fractions x "
             f"{len(study.final.seeds)} seeds planned")
  if not any(math.isclose(baseline_fraction(study), float(f))
             for f in study.final.label_fractions):
    planned += (f", and {study.baseline} at {baseline_fraction(study):.0%} x "
                f"{len(study.final.seeds)} seeds")
  header = (f"# {study.name}\n\n"
            f"Test split scored {reads} times in this study by the networks: once per finished "
            f"final and student run ({planned}); the {len(tune_rows)} tuning rows scored "
            f"validation only.{raw_note}{zero_shot_note}{headline_note}\n\n"
            "## Headline\n\nPer arm and fraction: mean [95% CI] (seeds); then, against "
            f"`{study.baseline}`, the paired difference per seed: mean [95% CI] (pairs).\n\n"
            + "\n\n".join(headline_table(study, outputs["cells"], outputs["paired"], arms, t)
                          for t in dict.fromkeys(c["test_set"] for c in outputs["cells"]))
            + "\n\n## Selection on validation\n\n" + selection_table(selection, study.metric)
            + "\n## Test\n\n")
  storage.write_text(outputs["table_file"], header + outputs["table"] + "\n")
  storage.write_json(storage.join(path, STUDY_FILE), {
      "name": study.name, "test_reads": reads, "tuning_rows": len(tune_rows),
      "selection": selection, "arms": arms, "headline": headline})
  log(header + outputs["table"])
  return dict(outputs, test_reads=reads)


def run_study(study: ml_collections.ConfigDict, workdir: str, *,
              stages: tuple[str, ...] = STAGES, parallel: int = 1, arms: tuple[str, ...] = (),
              verbose: bool = True) -> dict[str, Any]:
  """Runs `stages` of the study in order (see the module docstring); returns what each made.

  `arms` (default: all) limits the tune, select, final and distill stages to those arms and
  students, e.g. to tune scratch while the pretraining runs elsewhere (an arm's choice depends
  on its own tuning runs only); the report always takes every arm.
  """
  log = print if verbose else (lambda *a, **k: None)
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
  check_config(study)
  unknown = [a for a in arms if a not in study.arms and a not in study.distill.students]
  if unknown:
    raise ValueError(f"unknown arm(s) {unknown}; arms: {', '.join(study.arms)}; students: "
                     f"{', '.join(study.distill.students)}")
  workdir = storage.absolute(workdir)
  storage.makedirs(workdir)
  # One persistent compilation cache for every stage: the tuning, final and student runs share
  # their programs (the sweeps would otherwise each start a cache of their own).
  sweep_run.enable_compilation_cache(sweep_run.compilation_cache_dir(workdir))
  out: dict[str, Any] = {}
  needs_pretraining = any(arm.init == "pretrain" for name, arm in study.arms.items()
                          if not arms or name in arms)
  if "pretrain" in stages and needs_pretraining:
    out["pretrain"] = run_pretraining(study, workdir, log)
  tune = tune_sweep(study, workdir, arms)
  if "tune" in stages and tune is not None:
    log("[tune] on the validation split only")
    out["tune"] = _run(tune, storage.join(workdir, TUNE_DIR), parallel,
                       f"{study.name}: tuning (validation)", log)
  if "select" in stages:
    selection = select(study, _rows(tune, storage.join(workdir, TUNE_DIR)), arms)
    path = storage.join(workdir, SELECTION_FILE)
    if arms and storage.exists(path):  # the other arms' choices stand
      selection = {**storage.read_json(path), **selection}
    storage.write_json(path, selection)
    log("[select]\n" + selection_table(selection, study.metric))
    out["selection"] = selection
  if "final" in stages:
    out["final"] = _run(final_sweep(study, workdir, read_selection(workdir), arms),
                        storage.join(workdir, FINAL_DIR), parallel, f"{study.name}: test", log)
  students = tuple(a for a in arms if a in study.distill.students)
  if "distill" in stages and study.distill.students and (students or not arms):
    out["distill"] = _run(distill_sweep(study, workdir, read_selection(workdir), students),
                          storage.join(workdir, DISTILL_DIR), parallel,
                          f"{study.name}: students", log)
  if "report" in stages:
    out["report"] = report(study, workdir, read_selection(workdir), log)
  return out


def main(argv):
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  flag_values = flags.FLAGS
  stages = tuple(s.strip() for s in flag_values.stages.split(",") if s.strip())
  try:
    run_study(flag_values.config, flag_values.workdir, stages=stages,
              parallel=flag_values.parallel,
              arms=tuple(a.strip() for a in flag_values.arms.split(",") if a.strip()))
  except InterruptedError as e:
    print(f"Interrupted: {e}", file=sys.stderr)
    sys.exit(run_files.EXIT_PREEMPTED)
  except (RuntimeError, ValueError, FileNotFoundError) as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Study config (configs/studies/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The study's folder (one subfolder per stage).")
  flags.DEFINE_string("stages", ",".join(STAGES), "Comma-separated stages to run, in order: "
                      + ", ".join(STAGES) + ".")
  flags.DEFINE_integer("parallel", 1, "Fine-tuning runs at once (1: in this process).")
  flags.DEFINE_string("arms", "", "Comma-separated arms (and students) for the tune, select, "
                      "final and distill stages (default: all).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
