r"""REMEDIS vs scratch on the built-in synthetic chest X-rays: a small measurement, not a sweep.

  JAX_COMPILATION_CACHE_DIR=/tmp/recipe_jax_cache python -m \
      experiments.benchmarks.remedis_vs_scratch --workdir=/tmp/recipe_run \
      --fractions=0.02,0.1,1.0 --seeds=0,1

Steps (each skipped when its output already exists in --workdir, so a rerun only adds rows):
  1. SimCLR pretraining with --pretrain_config (default configs/pretrain_simclr.py:tiny) on the
     unlabeled split (all four sites, no labels) -> WORKDIR/pretrain, exported with its
     projection head to WORKDIR/export.
  2. Linear probe (optional, --probe): logistic regression (scikit-learn) on frozen pre_logits
     of the site-A training images at each label fraction, for the random-init and the
     pretrained encoder; macro AUC on test@A..D. A cheap read-out of what pretraining learned.
  3. Fine-tuning with --finetune_config (default configs/finetune.py:tiny: site A train/val,
     test at A, B, C, D) from scratch and from the export, at each label fraction x seed
     (the seed also picks the labeled subset) -> WORKDIR/ft_<init>_f<fraction>_s<seed>.
Prints one table: test macro AUC per site, mean and spread over seeds.

The runs made with it (the tiny recipes' search, and why the REMEDIS init does not beat scratch
at this scale): experiments/results/quickstart/README.md.
"""

from __future__ import annotations

import collections
import json
import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
from sklearn import linear_model, metrics, preprocessing

from data_pipelines import ops as ops_lib, presets
from data_pipelines.sources import synthetic
from remedis_jax import export, models, train_finetune, train_simclr

config_flags.DEFINE_config_file("pretrain_config", "configs/pretrain_simclr.py:tiny",
                                "SimCLR pretraining config.", lock_config=True)
config_flags.DEFINE_config_file("finetune_config", "configs/finetune.py:tiny",
                                "Fine-tuning config.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for every run of this measurement.", required=True)
flags.DEFINE_list("fractions", ["0.02", "0.1"], "Label fractions of the site-A training split.")
flags.DEFINE_list("seeds", ["0", "1"], "Fine-tuning seeds (model init, data order, subset).")
flags.DEFINE_list("inits", ["scratch", "remedis"], "Which initialisations to fine-tune.")
flags.DEFINE_bool("probe", True, "Also run the frozen-feature linear probe.")
flags.DEFINE_bool("finetune", True, "Run the fine-tuning grid.")
flags.DEFINE_float("remedis_lr", -1.0, "Fine-tuning learning rate for the pretrained init "
                   "(-1: the finetune config's).")
flags.DEFINE_string("pretrain_ops", "", "Op string replacing the preset's pretraining ops "
                    "(to measure a crop scale or colour strength before changing the preset).")
FLAGS = flags.FLAGS

SITES = ("A", "B", "C", "D")


def pretrain_and_export(workdir: str) -> tuple[str, float]:
  """Runs (or reuses) the pretraining; returns the export folder and the pretraining seconds."""
  pretrain_dir = os.path.join(workdir, "pretrain")
  export_dir = os.path.join(workdir, "export")
  if export.is_export(export_dir):
    return export_dir, float("nan")
  if FLAGS.pretrain_ops:
    preset_fn = presets.get_preset
    presets.get_preset = lambda name, mode, size: (
        ops_lib.parse_ops(FLAGS.pretrain_ops) if mode == "pretrain" else preset_fn(name, mode, size))
  start = time.time()
  summary = train_simclr.train_and_evaluate(FLAGS.pretrain_config, pretrain_dir)
  seconds = time.time() - start
  logging.info("pretraining summary: %s", summary)
  export.export_workdir(pretrain_dir, export_dir, include_head=True)
  with open(os.path.join(workdir, "pretrain_time.json"), "w", encoding="utf-8") as f:
    json.dump({"seconds": seconds}, f)
  return export_dir, seconds


def _features(module, params, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """pre_logits of uint8 (N, S, S, 1) images, preprocessed as the trainers do."""
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x, train=False)[0])
  out = []
  for start in range(0, len(images), batch_size):
    x = jnp.asarray(images[start:start + batch_size], jnp.float32) / 127.5 - 1.0
    x = jnp.repeat(x, 3, axis=-1)
    out.append(np.asarray(apply(params, x)))
  return np.concatenate(out)


def _render(split: str, n: int, sites: str, size: int, seed: int):
  source = synthetic.SyntheticCXR(split, num_examples=n, image_size=size, sites=sites, seed=seed)
  images = np.stack([source[i]["image"] for i in range(n)])
  return images, source.findings.astype(np.int32)


def linear_probe(export_dir: str, fractions: list[float], seeds: list[int]) -> dict:
  """Macro AUC of logistic regression on frozen features: {(init, fraction): {site: [auc]}}."""
  ft = FLAGS.finetune_config
  size = ft.data.image_size
  n_train = ft.data.num_examples.train
  train_images, train_y = _render("train", n_train, "A", size, ft.data.seed)
  tests = {s: _render("test", ft.data.num_examples.test, s, size, ft.data.seed) for s in SITES}
  module, pretrained = export.create_encoder_from_export(export_dir)
  random_init = module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)["params"]
  results = collections.defaultdict(lambda: collections.defaultdict(list))
  for init, params in (("scratch", random_init), ("remedis", pretrained)):
    train_f = _features(module, params, train_images)
    test_f = {s: _features(module, params, x) for s, (x, _) in tests.items()}
    for fraction in fractions:
      for seed in seeds:
        rng = np.random.default_rng(seed)
        idx = rng.permutation(n_train)[:max(8, int(round(fraction * n_train)))]
        scaler = preprocessing.StandardScaler().fit(train_f[idx])
        aucs = {s: [] for s in SITES}
        for k in range(train_y.shape[1]):
          y = train_y[idx, k]
          if y.min() == y.max():
            continue
          clf = linear_model.LogisticRegression(C=0.1, max_iter=2000)
          clf.fit(scaler.transform(train_f[idx]), y)
          for s in SITES:
            x, ty = test_f[s], tests[s][1][:, k]
            aucs[s].append(metrics.roc_auc_score(ty, clf.decision_function(scaler.transform(x))))
        for s in SITES:
          results[(init, fraction)][s].append(float(np.mean(aucs[s])))
  return results


def finetune(export_dir: str, init: str, fraction: float, seed: int) -> tuple[dict, float]:
  """One fine-tuning run; returns ({site: test macro AUC}, wall seconds)."""
  workdir = os.path.join(FLAGS.workdir, f"ft_{init}_f{fraction:g}_s{seed}")
  config = FLAGS.finetune_config.copy_and_resolve_references()
  with config.unlocked():
    config.label_fraction = fraction
    config.label_fraction_seed = seed
    config.seed = seed
    if init == "remedis":
      config.model.init = export_dir
      if FLAGS.remedis_lr > 0:
        config.optimizer.learning_rate = FLAGS.remedis_lr
  start = time.time()
  results = train_finetune.train_and_evaluate(config, workdir)
  seconds = results.get("wall_time_s", time.time() - start)
  by_name = results["test_sets"]
  names = {"in_distribution": "A", "site_B": "B", "site_C": "C", "site_D": "D"}
  return {names.get(k, k): v["metrics"]["macro_auc"] for k, v in by_name.items()}, seconds


def _row(label: str, per_site: dict) -> str:
  cells = []
  for s in SITES:
    values = per_site.get(s, [])
    cells.append(f"{np.mean(values):.3f}±{np.std(values):.3f}" if values else "-")
  return f"{label:<28}" + "".join(f"{c:>14}" for c in cells)


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  fractions = [float(f) for f in FLAGS.fractions]
  seeds = [int(s) for s in FLAGS.seeds]
  export_dir, pretrain_s = pretrain_and_export(FLAGS.workdir)
  header = f"{'':<28}" + "".join(f"{'site ' + s:>14}" for s in SITES)
  lines = [f"pretraining: {pretrain_s:.0f} s (nan: reused), steps "
           f"{FLAGS.pretrain_config.total_steps}"]
  if FLAGS.probe:
    probe = linear_probe(export_dir, fractions, seeds)
    lines += ["linear probe on frozen pre_logits, test macro AUC (mean±std over seeds)", header]
    for (init, fraction), per_site in sorted(probe.items(), key=lambda kv: (kv[0][1], kv[0][0])):
      lines.append(_row(f"{init} f={fraction:g}", per_site))
    print("\n".join(lines), flush=True)
  if FLAGS.finetune:
    table = collections.defaultdict(lambda: collections.defaultdict(list))
    times = []
    for fraction in fractions:
      for seed in seeds:
        for init in FLAGS.inits:
          aucs, seconds = finetune(export_dir, init, fraction, seed)
          times.append(seconds)
          for s, v in aucs.items():
            table[(init, fraction)][s].append(v)
    lines += [f"fine-tuning ({np.median(times):.0f} s median per run), test macro AUC "
              "(mean±std over seeds)", header]
    for (init, fraction), per_site in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
      lines.append(_row(f"{init} f={fraction:g}", per_site))
  text = "\n".join(lines)
  print(text, flush=True)
  with open(os.path.join(FLAGS.workdir, "table.txt"), "w", encoding="utf-8") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
