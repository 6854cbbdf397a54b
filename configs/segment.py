r"""Lung segmentation fine-tuning (encoder + light decoder), evaluated in distribution and at
shifted sites (test-time drift). Trainer: remedis_jax/train_segment.py.

Variants (`--config=configs/segment.py:<variant>`):

  smoke   the smallest run that exercises everything (ViT-micro/4, 32 px, 4 steps): tests.
  tiny    built-in synthetic chest X-rays (lung_mask built in) at 32 px, trained on site A,
          tested on site A (in distribution) and sites B, C, D (drift), ViT-tiny/4, 300 steps,
          CPU minutes. From scratch:
            python -m remedis_jax.main --config=configs/segment.py:tiny \
              --workdir=workdirs/segment_tiny
          From a GMML pretraining run (its params["encoder"] is a ViT-tiny/4):
            python -m remedis_jax.main --config=configs/segment.py:tiny \
              --config.model.init=workdirs/gmml/pretrain --workdir=workdirs/segment_gmml
          A ResNet instead of the ViT (the decoder then also uses the ResNet's stage outputs as
          skips): --config.model.name=R_tiny.
          Fewer masks: --config.label_fraction=0.05. The study over fractions x seeds x inits:
          experiments/segmentation_study.py.
  folder  a CXR folder with a CSV manifest holding a split column and a mask column (mask
          images, nonzero = lung, same size as the image), ViT-S/16 at 224 px (GPU/TPU):
            python -m remedis_jax.main --config=configs/segment.py:folder \
              --config.data.root=/data/cxr --config.data.manifest=/data/cxr/masks.csv \
              --config.data.mask_column=mask_path --config.model.init=/runs/gmml_vits16 \
              --workdir=/runs/segment_cxr

Keys a study sets (any key can be overridden with --config.<key>=<value>; a typo is an error):
  config.model.init            "" (scratch), a pretraining workdir, an export, a BiT .npz.
  config.model.name            the encoder ("ViT-tiny/4", "R_tiny", "ViT-S/16", ...).
  config.label_fraction        share of the training masks, in (0, 1].
  config.label_fraction_seed   which subset (nested across fractions); subset_manifest.json.
  config.seed                  model init, augmentation and data order.
  config.test_sets             "name=split" or "name=split@sites" (synthetic sites).
  config.freeze_encoder        True: train the decoder only.
  config.loss.dice_weight      weight of the soft Dice loss added to the pixel cross-entropy.

Outputs: WORKDIR/results.json (Dice / IoU per test set; schema in remedis_jax/train_segment.py),
predictions/<test set>.png, subset_manifest.json, metrics.jsonl, checkpoints/ and best/.
"""

import ml_collections

from configs import common

VARIANTS = ("tiny", "smoke", "folder")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of `variant` (see the module docstring)."""
  variant = common.parse_variant(arg, VARIANTS, default="tiny")
  from remedis_jax import optimizers  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict()
  config.trainer = "segment"
  config.variant = variant
  config.seed = 0

  config.data = common.data_config()
  config.data.train_split = "train"
  config.data.val_split = "val"     # chooses the best checkpoint (mean per-image Dice)
  # Geometric ops move lung_mask with the image; "" = the preset's "finetune" / "eval" ops.
  config.data.train_ops = ""
  config.data.eval_ops = ""
  config.test_sets = ("test",)

  config.label_fraction = 1.0
  config.label_fraction_seed = 0
  # Uniform subset of the masks: classification labels are irrelevant to the mask task.
  config.label_fraction_stratify = False
  config.freeze_encoder = False

  config.batch_size = 64            # global, over all devices and hosts
  config.eval_batch_size = 128
  config.total_steps = -1           # > 0 exact; else total_epochs; else BiT-HyperRule by size
  config.total_epochs = -1.0

  config.model = ml_collections.ConfigDict()
  config.model.name = "ViT-S/16"
  config.model.init = ""
  config.model.dtype = "float32"
  config.model.remat = False
  config.model.stem = "bit"  # BiT ResNets only: "bit" (7x7/2 + max-pool), "small", "small_s2"
  config.model.decoder = ml_collections.ConfigDict({
      "width": 128,                 # channels of every decoder stage
      "num_groups": 8,              # GroupNorm groups of the decoder
      "skips": "auto",              # "auto": ResNet stage outputs; a ViT has none; "none"
  })

  config.loss = ml_collections.ConfigDict({"dice_weight": 1.0})
  config.threshold = 0.5            # predicted lung: probability >= threshold

  # AdamW with warm-up + cosine, the usual ViT fine-tuning optimiser (SETR, MAE/GMML
  # segmentation fine-tuning); norms and biases get no weight decay.
  config.optimizer = optimizers.default_optimizer_config()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.lr_scaling = "none"
  config.optimizer.weight_decay = 0.05
  config.optimizer.warmup_steps = -1  # -1: BiT-HyperRule's warm-up share of the schedule
  config.optimizer.schedule = "cosine"
  config.optimizer.grad_clip_norm = 1.0

  config.mesh = common.mesh_config()
  config.param_sharding = "replicate"

  config.eval_every_steps = 100
  config.num_figure_examples = 6    # rows of predictions/<test set>.png
  config.figure_seed = 0            # which records the figure shows (a seeded stratified sample)
  config.log_every_steps = 50
  # JAX's persistent compilation cache (remedis_jax/compilation_cache.py): "" = WORKDIR/
  # compilation_cache, "off", or a folder / URL shared by runs and hosts.
  config.compilation_cache_dir = ""
  # TensorBoard event files (a folder or a URL); "" = the workdir.
  config.tensorboard_dir = ""
  # jax.profiler trace of steps first_step.. for TensorBoard's Profile tab; num_steps 0 = off.
  config.profile = common.profile_config()
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.async_checkpointing = True
  config.progress_every_secs = 60.0

  if variant in ("tiny", "smoke"):
    config.data.source = "synthetic"
    config.data.image_size = 32
    config.data.sites.train = "A"
    config.data.sites.val = "A"
    config.test_sets = ("in_distribution=test@A", "site_B=test@B", "site_C=test@C",
                        "site_D=test@D")
    # A mild crop and rotation: both move the mask; the lung fields stay inside the image.
    config.data.train_ops = (f"random_resized_crop({config.data.image_size}, area=(0.8, 1.0), "
                             "aspect_ratio=(0.9, 1.1))|rotate(8, p=0.5)")
    config.data.eval_ops = f"resize({config.data.image_size})"
  if variant == "tiny":
    config.batch_size = 32
    config.eval_batch_size = 128
    config.data.num_examples.val = 256
    config.data.num_examples.test = 256
    config.total_steps = 300
    config.optimizer.warmup_steps = 20
    config.model.name = "ViT-tiny/4"
    config.model.decoder.width = 64
    config.eval_every_steps = 50
    config.log_every_steps = 25
    config.checkpoint_every_steps = 300
    config.progress_every_secs = 15.0
  elif variant == "smoke":
    config.data.num_examples.train = 64
    config.data.num_examples.val = 16
    config.data.num_examples.test = 16
    config.test_sets = ("in_distribution=test@A", "site_C=test@C")
    config.label_fraction = 0.5
    config.batch_size = 8
    config.eval_batch_size = 8
    config.total_steps = 4
    config.optimizer.warmup_steps = 1
    config.model.name = "ViT-micro/4"  # compiles ~3x faster than R_micro on CPU
    config.model.decoder.width = 16
    config.model.decoder.num_groups = 4
    config.num_figure_examples = 3
    config.eval_every_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.async_checkpointing = False
  elif variant == "folder":
    config.data.source = "folder"
    config.data.split_column = "split"
    config.data.mask_column = "mask"
    config.data.label_columns = ""
    config.data.image_size = 224
    config.model.dtype = "bfloat16"
    config.data.worker_count = common.PAPER_SCALE_WORKERS
    config.eval_every_steps = 500
  return config
