"""The keys every sweep config has; configs/sweeps/*.py start from these.

Each sweep config calls `default_sweep_config` (experiments/sweep_plan.py plans its grid), an
OOD config `default_ood_config` (experiments/ood_study.py); imports neither JAX nor the
experiment scripts.
"""

import ml_collections

# The REMEDIS label fractions (Azizi et al. 2023): 1% to all labels.
DEFAULT_LABEL_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def default_sweep_config() -> ml_collections.ConfigDict:
  """A label-fraction sweep: every init x label fraction x seed fine-tunes `base`."""
  config = ml_collections.ConfigDict()
  config.base = "configs/finetune.py:tiny"
  config.overrides = ml_collections.ConfigDict()
  config.init_overrides = ml_collections.ConfigDict()
  config.label_fractions = DEFAULT_LABEL_FRACTIONS
  config.seeds = (0, 1, 2)
  config.inits = ml_collections.ConfigDict({"scratch": ""})
  config.baseline = "scratch"
  config.baseline_fraction = 1.0
  config.metric = "macro_auc"
  config.match_tolerance = 0.0
  config.finetune_mode = ""
  return config


def default_ood_config() -> ml_collections.ConfigDict:
  """An out-of-distribution study: a sweep config plus the sites."""
  config = default_sweep_config()
  config.site_a = "A"                  # the training site of step 1
  config.site_b = "B"                  # the new site of step 2
  config.zero_shot_sites = ("B", "C")  # evaluated without their labels in step 1
  config.site_a_label_fraction = 1.0   # step 1 trains on this share of site-A labels
  config.headline_init = "remedis"     # whose matching fraction is the headline
  return config
