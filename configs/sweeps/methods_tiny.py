r"""Pretraining methods compared at quickstart scale: scratch / SimCLR / cluster / hybrid inits.

Ghesu et al. (2022: contrastive learning + online clustering, and a "hybrid" variant that adds
a supervised loss) claim, against the other initialisations: (a) a higher AUC at
every label fraction, (b) up to 85% faster convergence of the downstream training, and (c) more
robustness to intensity, rotation and scale changes. This grid measures all three on the
built-in synthetic chest X-rays: 4 inits x 3 label fractions (2%, 10%, 100% of 2048 site-A
training images) x 2 seeds = 24 `configs/finetune.py:tiny` runs of 800 steps, tested at site A
(in distribution) and site B, with every test-time perturbation of
remedis_jax/evaluators/robustness.py on the in-distribution test set.

The whole study, from the repository root (CPU; minutes per pretraining, 40-60 s per run):

  # 1. the three pretrainings (the sweep reads their workdirs)
  python -m remedis_jax.main --config=configs/pretrain_simclr.py:tiny \
    --workdir=workdirs/methods/simclr
  python -m remedis_jax.main --config=configs/pretrain_cluster.py:tiny \
    --workdir=workdirs/methods/cluster
  python -m remedis_jax.main --config=configs/pretrain_cluster.py:hybrid_tiny \
    --workdir=workdirs/methods/hybrid
  # 2. the fine-tuning grid; (a): results.csv, data_efficiency.png, summary.md
  python -m experiments.label_fraction_sweep --config=configs/sweeps/methods_tiny.py \
    --workdir=workdirs/methods/sweep [--parallel=2]
  # 3. (b) steps to a validation target, reduction vs scratch: convergence.{csv,json,md,png}
  python -m experiments.convergence_report --workdir=workdirs/methods/sweep
  # 4. (c) drop under each perturbation: robustness.{csv,json,md}
  python -m experiments.robustness_report --workdir=workdirs/methods/sweep

Check the grid first (lists the 24 runs; fails, naming the init, if a pretraining workdir holds
no checkpoint yet):
  python -m experiments.label_fraction_sweep --config=configs/sweeps/methods_tiny.py \
    --workdir=workdirs/methods/sweep --mode=plan

A subset of the inits: `--config=configs/sweeps/methods_tiny.py:scratch,simclr` (comma-separated
names; scratch, the baseline, is always kept). Another pretraining run:
`--config.inits.cluster=workdirs/my_cluster_run`.

Reading the numbers. The hybrid pretraining uses labels (configs/pretrain_cluster.py:
hybrid_tiny: 10% of a separate labeled synthetic split), in ADDITION to the fine-tuning labels:
its cells have seen more labels than their fraction says, so they are not a like-for-like
comparison at equal label counts (most visible at 2% and 10%). 2 seeds give a rough spread
only, and the convergence resolution is the validation interval (100 steps): a smoke-level
demonstration, not evidence. Expect none of the three claims to hold at this scale
(experiments/results/methods_tiny/README.md).
"""

import ml_collections

from configs.sweeps import common as sweep_common

INITS = {
    "scratch": "",
    "simclr": "workdirs/methods/simclr",
    "cluster": "workdirs/methods/cluster",
    "hybrid": "workdirs/methods/hybrid",
}
# Every perturbation kind of remedis_jax/evaluators/robustness.py: intensity (exposure, offset,
# detector response), rotation (patient positioning) and scale (field of view), at the
# strengths of configs/finetune.py's defaults.
PERTURBATIONS = ("intensity_scale(0.8)", "intensity_shift(0.1)", "gamma(0.7)", "gamma(1.5)",
                 "rotate(15)", "scale(0.85)", "scale(1.15)")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The methods grid; `arg` = comma-separated init names to keep (default: all four)."""
  names = [n.strip() for n in (arg or "").split(",") if n.strip()] or list(INITS)
  unknown = [n for n in names if n not in INITS]
  if unknown:
    raise ValueError(f"configs/sweeps/methods_tiny.py:{arg}: unknown init(s) {unknown}; known: "
                     f"{', '.join(INITS)}")
  config = sweep_common.default_sweep_config()
  config.base = "configs/finetune.py:tiny"
  config.label_fractions = (0.02, 0.1, 1.0)
  config.seeds = (0, 1)
  config.inits = ml_collections.ConfigDict(
      {name: path for name, path in INITS.items() if name == "scratch" or name in names})
  config.baseline = "scratch"
  config.baseline_fraction = 1.0
  config.metric = "macro_auc"
  config.match_tolerance = 0.0
  config.overrides = ml_collections.ConfigDict({
      # The tiny recipe's length and validation interval (configs/finetune.py): the validation
      # curve every 100 steps is what experiments/convergence_report.py reads.
      "total_steps": 800,
      "eval_every_steps": 100,
      "test_sets": ("in_distribution=test@A", "site_B=test@B"),
      # Claim (c): every perturbation on the in-distribution test set only (site B is already
      # a shift; perturbing it too would mix two effects). 7 extra evaluations of 512 images.
      "robustness": {"perturbations": PERTURBATIONS, "test_sets": ("in_distribution",)},
      "data": {"num_examples": {"val": 256, "test": 512}},
  })
  return config
