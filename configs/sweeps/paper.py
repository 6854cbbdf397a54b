r"""The REMEDIS paper-scale label-efficiency grid (documented, not run in this repository's CI).

  python -m experiments.label_fraction_sweep --config=configs/sweeps/paper.py \
    --config.overrides.data.path=/data/cxr_shards \
    --config.inits.bit=/weights/BiT-M-R50x1.npz \
    --config.inits.remedis=/exports/remedis_r50x1 \
    --workdir=/runs/sweep_cxr --mode=joblist
  # then: sbatch --array=1-N ... (printed), and afterwards the same command with --mode=aggregate

Grid (Azizi et al. 2023, Nature Biomedical Engineering, "data-efficient generalisation"):
R50x1 at 224 px (`configs/finetune.py:r50x1`, BiT-HyperRule: SGD momentum 0.9, lr 0.003 at batch
512, schedule length by labeled-subset size), label fractions 1, 2, 5, 10, 25, 50, 100%, 3 seeds,
initialisations
  scratch   random init, supervised only;
  bit       BiT-M (ImageNet-21k supervised) weights -- the paper's strong supervised baseline;
  remedis   BiT-M + SimCLR pretraining on unlabeled medical images (an export of
            configs/pretrain_simclr.py:r50x1, `python -m remedis_jax.export ... --include_head`).
Baseline: `bit` on 100% of the labels (the paper's "supervised baseline"); the table answers
"with what share of the labels does REMEDIS match it". 3 x 7 x 3 = 63 runs: use --mode=joblist
and a cluster. Data: any source of configs/common.py data_config (here an ArrayRecord folder
written by data_pipelines/convert.py; set data.source/path/root/manifest as for fine-tuning).
"""

import ml_collections

from configs.sweeps import common as sweep_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = sweep_common.default_sweep_config()
  config.base = "configs/finetune.py:r50x1"
  config.label_fractions = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
  config.seeds = (0, 1, 2)
  config.inits = ml_collections.ConfigDict({
      "scratch": "",
      "bit": "/weights/BiT-M-R50x1.npz",
      "remedis": "/exports/remedis_r50x1",
  })
  config.baseline = "bit"
  config.baseline_fraction = 1.0
  config.metric = "macro_auc"
  config.match_tolerance = 0.0
  config.overrides = ml_collections.ConfigDict({
      "data": {"source": "array_record", "path": ""},  # --config.overrides.data.path=...
  })
  return config
