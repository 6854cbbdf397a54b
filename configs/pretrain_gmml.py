r"""GMML pretraining of a Vision Transformer (Atito et al.; SS-CXR / SPCXR, Anwar et al.).

Variants (`--config=configs/pretrain_gmml.py:<variant>`):

  smoke    the smallest run that exercises everything (ViT-micro/4, 32 px, 4 steps): the tests.
  tiny     built-in synthetic chest X-rays (unlabeled split, all sites), ViT-tiny/4 at 32 px,
           CPU: a few minutes.
             python -m remedis_jax.main --config=configs/pretrain_gmml.py:tiny \
               --workdir=workdirs/gmml/pretrain
           Watch reconstruction/heldout_masked_l1 in metrics.jsonl (the masked-pixel L1, in
           [-1, 1] units, on a fixed batch of 16 validation images) and the grids in
           workdirs/gmml/pretrain/reconstructions/step_<N>.png (rows: input, corrupted,
           reconstruction). Expect the held-out L1 to fall from ~0.68 to ~0.30 in 600 steps
           (experiments/results/gmml_tiny/README.md).
  vit_s16  paper scale for GPU/TPU: ViT-S/16 at 224 px (SS-CXR's encoder), batch 256, AdamW
           lr 5e-4 x batch/256 after 10 warm-up epochs, cosine to 1e-6, weight decay cosine
           0.04 -> 0.4, gradient clipping at 3.0, 800 epochs: the defaults of the authors'
           GMML code (github.com/Sara-Ahmed/GMML, main.py; batch 64 per GPU x 4 GPUs). SS-CXR
           does not publish different ones, so these are the GMML defaults, not SS-CXR's.
             python -m remedis_jax.main --config=configs/pretrain_gmml.py:vit_s16 \
               --config.data.source=folder --config.data.root=/data/cxr \
               --config.data.manifest=/data/cxr/train.csv --workdir=/runs/gmml_vit_s16

Keys beyond configs/pretrain_simclr.py's shared ones (data, mesh, kNN, logging, checkpoints):
  model.head_hidden_dims    GELU hidden layers of the reconstruction head (SiT/GMML: three of
                            the token width). model.projection_dim / head_norm are unused.
  gmml.clean_ops            the clean view (reconstruction target); "{size}" = data.image_size.
  gmml.corrupt_ops          intensity-only ops on the clean view before masking (no geometry:
                            the target must be pixel-aligned with the input).
  gmml.coverage             (low, high): per-image target masked fraction, uniform. GMML code:
                            uniform in [min(0.5, 0.75), 0.75] = (0.5, 0.75).
  gmml.max_group_share      largest group side / grid side (GMML code: 0.3).
  gmml.fill_shares          (noise, zeros, other_image) shares. GMML code: half of the images
                            noise-filled, half replaced from another image (there with coverage
                            <= 0.3; here both share `coverage`): (0.5, 0.0, 0.5).
  gmml.noise                "gaussian" (127.5 +- 64 in uint8, ~ their N(0, 1) in normalised
                            units) or "uniform".
  gmml.monitor_*            the held-out reconstruction monitor: split, number of images, seed,
                            every how many steps (0: off); gmml.grid_images per PNG row.
  optimizer.weight_decay_end  the weight decay's cosine target (None: constant).

Our choices (not in the papers): clean view crop area 0.8-1 + flip + light brightness /
contrast (GMML's code crops 0.05-1 on natural images; tiny CXRs at 32 px lose the anatomy at
small crops); corrupted view = the SimCLR-CXR intensity changes (brightness / contrast 0.4,
gamma, blur) instead of GMML's colour jitter + grayscale + solarisation, which are undefined or
implausible on grey radiographs; the reconstruction head reads only the last block (GMML's
code also adds blocks 6, 8, 10 for ViT-S; not done here).
"""

import ml_collections

from configs import common
from configs import pretrain_simclr

VARIANTS = ("tiny", "smoke", "vit_s16")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = common.parse_variant(arg, VARIANTS, default="tiny")
  base = {"tiny": "tiny", "smoke": "smoke", "vit_s16": "r50x1"}[variant]
  # Data, mesh, kNN, logging and checkpoint keys mean what they mean for SimCLR.
  config = pretrain_simclr.get_config(base)
  config.trainer = "gmml"
  config.variant = variant
  config.probe.enabled = False  # GMML reads no labels; the kNN monitor watches pre_logits

  config.model.name = "ViT-S/16"
  config.model.head_hidden_dims = (384, 384, 384)
  config.model.dtype = "bfloat16"

  config.gmml = ml_collections.ConfigDict({
      "clean_ops": ("random_resized_crop({size}, area=(0.8, 1.0))|flip_lr(0.5)"
                    "|color_jitter(brightness=0.1, contrast=0.1, p=0.3)"),
      "corrupt_ops": ("color_jitter(brightness=0.4, contrast=0.4, p=0.8)"
                      "|random_gamma((0.7, 1.5), p=0.5)|gaussian_blur(0.5)"),
      "coverage": (0.5, 0.75),
      "max_group_share": 0.3,
      "fill_shares": (0.5, 0.0, 0.5),
      "noise": "gaussian",
      "monitor_split": "val",
      "monitor_images": 16,
      "monitor_seed": 0,
      "monitor_every_steps": 1000,
      "grid_images": 8,
  })

  # AdamW as in the GMML code: lr 5e-4 x batch / 256, 10 warm-up epochs, cosine to min_lr
  # 1e-6; weight decay cosine 0.04 -> 0.4 (not on norms and biases); clip at 3.0.
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 5e-4
  config.optimizer.lr_scaling = "linear"
  config.optimizer.warmup_epochs = 10.0
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 0.04
  config.optimizer.weight_decay_end = 0.4
  config.optimizer.grad_clip_norm = 3.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999

  if variant == "vit_s16":
    config.data.image_size = 224
    config.data.worker_count = common.PAPER_SCALE_WORKERS
    config.batch_size = 256
    config.total_epochs = 800.0
    config.optimizer.end_lr_factor = 1e-6 / 5e-4  # min_lr 1e-6 at the peak lr of batch 256
    config.gmml.monitor_every_steps = 5000
    config.knn.every_steps = 5000
  elif variant == "tiny":
    config.model.name = "ViT-tiny/4"
    config.model.head_hidden_dims = (96,)
    config.model.dtype = "float32"
    config.batch_size = 64
    config.total_steps = 600
    config.optimizer.warmup_epochs = -1.0
    config.optimizer.warmup_steps = 30
    config.optimizer.learning_rate = 4e-3  # x 64/256 = 1e-3 peak: short CPU run, small ViT
    config.optimizer.end_lr_factor = 0.01
    config.gmml.monitor_every_steps = 100
  elif variant == "smoke":
    config.model.name = "ViT-micro/4"
    config.model.head_hidden_dims = (32,)
    config.model.dtype = "float32"
    config.optimizer.warmup_epochs = -1.0
    config.optimizer.warmup_steps = 1
    config.optimizer.learning_rate = 1e-3
    config.gmml.monitor_images = 8
    config.gmml.monitor_every_steps = 2
    config.gmml.grid_images = 4
    config.knn.every_steps = 4
  return config
