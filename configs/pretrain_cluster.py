r"""Contrastive learning + online clustering (Ghesu et al. 2022), optionally hybrid-supervised.

Variants (`--config=configs/pretrain_cluster.py:<variant>`):

  smoke        the smallest run that exercises everything (R_micro, 32 px, 4 steps): the tests.
  hybrid_smoke the same with the supervised loss on half of the labels.
  tiny         built-in synthetic chest X-rays (unlabeled split, all sites), R_tiny at 32 px,
               2 global 32 px views + 2 local 16 px views, CPU: a few minutes.
                 python -m remedis_jax.main --config=configs/pretrain_cluster.py:tiny \
                   --workdir=workdirs/methods/cluster
               Watch train/cluster_usage_entropy (log 32 = 3.47 when all 32 prototypes are used
               equally; near 0 means the codes collapsed) and knn/macro_auc.
  hybrid_tiny  the same data stream but labeled (a separate synthetic split, "pretrain", all
               sites), with the supervised loss on 10% of its records (819 labeled images):
                 python -m remedis_jax.main --config=configs/pretrain_cluster.py:hybrid_tiny \
                   --workdir=workdirs/methods/hybrid
               These labels are in ADDITION to any fine-tuning labels: a label-fraction sweep
               from this init is not a like-for-like comparison at equal label counts.
  medmnist     a MedMNIST .npz (e.g. PneumoniaMNIST) at 32 px, CPU: minutes.
                 python -m remedis_jax.main --config=configs/pretrain_cluster.py:medmnist \
                   --config.data.path=/path/to/pneumoniamnist.npz --workdir=workdirs/cluster_pm
  r50x1        paper scale on TPU pods / GPU clusters: R50x1 from BiT-M weights, batch 4096, 2 x
               224 px global + 6 x 96 px local crops, LARS, 3000 prototypes. Ghesu et al. do
               not publish their hyper-parameters; the clustering ones are SwAV's defaults
               (Caron et al. 2020: epsilon 0.05, 3 Sinkhorn iterations, temperature 0.1,
               prototypes frozen for the first epoch, a queue for per-device batches < 256).
                 python -m remedis_jax.main --config=configs/pretrain_cluster.py:r50x1 \
                   --config.data.source=array_record --config.data.path='/data/cxr_shards/*' \
                   --config.model.init=/weights/BiT-M-R50x1.npz --workdir=/shared/runs/cluster

Keys beyond configs/pretrain_simclr.py's:
  loss.contrastive_weight / loss.cluster_weight / loss.supervised_weight   the objective's terms
                            (supervised_weight > 0 is the hybrid mode; it needs labels).
  cluster.num_prototypes, cluster.temperature, cluster.sinkhorn_iters, cluster.sinkhorn_epsilon,
  cluster.freeze_prototypes_steps, cluster.queue_size (0: no queue), cluster.queue_start_step.
  multicrop.num_local, multicrop.local_size       small crops that only predict codes.
  hybrid.label_fraction, hybrid.label_fraction_seed   which records' labels the hybrid may use.
"""

import ml_collections

from configs import common
from configs import pretrain_simclr

VARIANTS = ("tiny", "hybrid_tiny", "smoke", "hybrid_smoke", "medmnist", "r50x1")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg, VARIANTS, default="tiny")
  hybrid = variant.startswith("hybrid_")
  base = {"tiny": "tiny", "hybrid_tiny": "tiny", "smoke": "smoke", "hybrid_smoke": "smoke",
          "medmnist": "medmnist", "r50x1": "r50x1"}[variant]
  # Everything SimCLR has (data, model, optimiser, mesh, kNN, checkpoints) with the same
  # meaning; only the objective's keys are added here.
  config = pretrain_simclr.get_config(base)
  config.trainer = "cluster"
  config.variant = variant

  config.loss.contrastive_weight = 1.0
  config.loss.cluster_weight = 1.0
  config.loss.supervised_weight = 0.0
  config.cluster = ml_collections.ConfigDict({
      "num_prototypes": 3000,
      "temperature": 0.1,
      "sinkhorn_iters": 3,
      "sinkhorn_epsilon": 0.05,
      "freeze_prototypes_steps": 313,  # SwAV: one epoch of ImageNet at batch 4096
      "queue_size": 0,
      "queue_start_step": 0,
  })
  config.multicrop = ml_collections.ConfigDict({"num_local": 6, "local_size": 96})
  config.hybrid = ml_collections.ConfigDict({"label_fraction": 1.0, "label_fraction_seed": 0})

  config.data.preset = "ghesu"
  if base in ("tiny", "smoke", "medmnist"):
    # 32 px global views: 2 local views of 16 px; fewer prototypes than images per batch x 2.
    config.cluster.num_prototypes = {"tiny": 32, "smoke": 8, "medmnist": 32}[base]
    config.cluster.freeze_prototypes_steps = {"tiny": 30, "smoke": 2, "medmnist": 50}[base]
    config.multicrop.num_local = 2
    config.multicrop.local_size = 16

  if hybrid:
    config.loss.supervised_weight = 1.0
    config.probe.enabled = False  # the hybrid classifier already reports supervised accuracy
    if base == "tiny":
      # A labeled stream of the synthetic data ("unlabeled" is the one split without labels),
      # the same size and sites as the unlabeled split SimCLR and clustering pretrain on.
      config.data.pretrain_split = "pretrain"
      config.data.num_examples.pretrain = config.data.num_examples.unlabeled
      config.data.sites.pretrain = "all"
      config.hybrid.label_fraction = 0.1
    elif base == "smoke":
      config.data.pretrain_split = "train"
      config.hybrid.label_fraction = 0.5
  return config
