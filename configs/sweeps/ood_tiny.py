r"""Out-of-distribution study at quickstart scale (built-in synthetic chest X-rays, CPU).

  python -m experiments.ood_study --config=configs/sweeps/ood_tiny.py \
    --workdir=workdirs/quickstart/ood

Step 1 fine-tunes scratch and REMEDIS (the quickstart's SimCLR run) on all site-A labels and
tests at A, and zero-shot at B and C (C stores inverted images: the hardest shift). Step 2
fine-tunes each init on 2%, 10% and 100% of site-B labels; the headline is the smallest site-B
fraction at which REMEDIS matches scratch trained on all site-B labels. 2 seeds, 800 steps per
run (the tiny sweep's overrides): 2 x 2 + 2 x 3 x 2 = 16 runs. Point REMEDIS elsewhere with
--config.inits.remedis=<pretraining workdir or export>; `:scratch` drops it (no pretraining
needed; there is then no headline init, so headline_init becomes scratch).
"""

import ml_collections

from configs.sweeps import tiny
from configs.sweeps import common as sweep_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = sweep_common.default_ood_config()
  sweep = tiny.get_config(arg)
  for key in ("base", "seeds", "inits", "baseline", "baseline_fraction", "metric",
              "match_tolerance", "overrides"):
    config[key] = sweep[key]
  # The test sets are chosen per step by the study (site_<X>=test@<X>).
  with config.overrides.unlocked():
    del config.overrides["test_sets"]
  config.label_fractions = (0.02, 0.1, 1.0)
  config.site_a = "A"
  config.site_b = "B"
  config.zero_shot_sites = ("B", "C")
  config.site_a_label_fraction = 1.0
  config.headline_init = "scratch" if arg == "scratch" else "remedis"
  return config
