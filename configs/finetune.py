r"""Fine-tuning a BiT encoder on labeled medical images (REMEDIS stage 3), and its evaluation.

Variants (`--config=configs/finetune.py:<variant>[,lars]`):

  smoke          the smallest run that exercises everything (R_micro, 32 px, 4 steps): tests.
  tiny           built-in synthetic chest X-rays, trained on site A with 10% of the labels,
                 tested on site A (in distribution) and on sites B, C, D (out of distribution),
                 R_tiny at 32 px, 800 steps, CPU (under a minute). From scratch expect test
                 macro AUC ~0.79 at site A, ~0.76 at B, ~0.5 at C (inverted images).
                   python -m remedis_jax.main --config=configs/finetune.py:tiny \
                     --workdir=workdirs/finetune_tiny
                 From a SimCLR pretraining run (REMEDIS) instead of scratch:
                   python -m remedis_jax.main --config=configs/finetune.py:tiny \
                     --config.model.init=workdirs/simclr_tiny --workdir=workdirs/finetune_remedis
  tiny_vit       `tiny` with ViT-tiny/4 and AdamW (lr 1e-3, weight decay 0.05; the runs
                 behind it: experiments/results/gmml_tiny/README.md), e.g. from GMML:
                   python -m remedis_jax.main --config=configs/finetune.py:tiny_vit \
                     --config.model.init=workdirs/gmml/pretrain --workdir=workdirs/finetune_gmml
  pneumoniamnist real PneumoniaMNIST, MedMNIST v2 protocol (28 px, official train/val/test
                 splits, no augmentation, Adam lr 1e-3, batch 128, 100 epochs, model chosen on
                 validation); prints the published baselines (ResNet-18 at 28 px: AUC 0.944,
                 ACC 0.854) beside our numbers. The file is yours: data.path has no default.
                   python -m remedis_jax.main --config=configs/finetune.py:pneumoniamnist \
                     --config.data.path=../shared/data/pneumoniamnist.npz \
                     --workdir=workdirs/finetune_pmnist
  pneumoniamnist_tuned
                 the setup the PneumoniaMNIST study chose on validation for scratch and for
                 SimCLR alike (experiments/results/pneumoniamnist_study/): 300 epochs, Adam
                 3e-3, a mild random crop (area 0.8-1) and a left-right flip. Its SimCLR arm
                 adds --config.encoder_frozen_fraction=0.5 --config.model.init=PRETRAINING.
  medmnist       the same protocol for any MedMNIST .npz (set --config.data.path).
  folder         a folder of images + CSV manifest with a split column, R50x1 at 224 px from
                 BiT-M weights, BiT-HyperRule schedule (GPU/TPU):
                   python -m remedis_jax.main --config=configs/finetune.py:folder \
                     --config.data.root=/data/cxr --config.data.manifest=/data/cxr/labels.csv \
                     --config.model.init=/weights/BiT-M-R50x1.npz --workdir=/runs/ft_cxr
  r50x1          paper scale: R50x1 at 224 px, batch 512, BiT-HyperRule (SGD momentum 0.9,
                 lr 0.003 at batch 512, no weight decay, zero-initialised head, schedule length
                 by dataset size); init from a REMEDIS export:
                   python -m remedis_jax.main --config=configs/finetune.py:r50x1 \
                     --config.data.source=array_record --config.data.path=/data/shards \
                     --config.model.init=/exports/remedis_r50x1 --workdir=/shared/runs/ft

Appending `,lars` to a variant switches to the SimCLR fine-tuning recipe: LARS, momentum 0.9,
no weight decay, learning rate linear in batch/256 (a starting point to tune), cosine decay.

Keys a sweep sets (any key can be overridden with --config.<key>=<value>; a typo is an error):
  config.model.init             "" (scratch), a BiT .npz or timm .safetensors, a pretraining
                                workdir, or an export.
  config.model.from_head_layer  True: classify from the first projection-head layer (SimCLR v2);
                                needs an init that carries the head (export --include_head).
  config.finetune_mode          "full" (every parameter trains) or "linear" (frozen encoder).
  config.encoder_lr_multiplier  the encoder's share of the learning rate (1.0: all the same).
  config.encoder_frozen_fraction  share of the steps, first, that train the head only (0: none;
                                then the encoder joins at encoder_lr_multiplier).
  config.label_fraction         share of the training labels, in (0, 1] (stratified, nested).
  config.label_fraction_seed    which subset; the manifest goes to WORKDIR/subset_manifest.json.
  config.seed                   model init, augmentation and data order.
  config.test_sets              named test sets, "name=split" or "name=split@sites" (the
                                synthetic source draws the split from those sites only, e.g.
                                "site_B=test@B"; the same split at two sites shows the SAME
                                patients acquired differently), or a split of another dataset,
                                "name=split@SOURCE:LOCATION[;key=value...]", read with the run's
                                image size, channels and eval ops and checked against its
                                classes before training, e.g. "adult=test@medmnist:/d/adult.npz",
                                "site_X=all@folder:/d/x/labels.csv;split_column=" (a folder's
                                root defaults to the manifest's folder; other keys, e.g.
                                split_column or label_columns, default to the run's),
                                "b=test@array_record:/d/shards_b". The first one is "in
                                distribution" for the robustness evaluation by default.
                                Afterwards: python -m experiments.evaluate_run --run=WORKDIR
                                --data.source=medmnist --data.path=FILE.npz --data.split=test
                                --out=DIR.
  config.total_steps            > 0: exact length; -1 with config.total_epochs > 0: epochs
                                (ceil(epochs x subset size / batch) steps at any fraction);
                                both -1: BiT-HyperRule by the size of the labeled subset
                                (< 20k: 500 steps, < 500k: 10k, else 20k; warm-up 100/500/500).
  config.num_evaluations        > 0: validation (best checkpoint) at that many evenly spaced
                                steps; 0: every config.eval_every_steps.
  config.loss.class_weights     "" (none), "balanced" (n / (K n_k), multi-class), "w1,w2,...".
  config.distill.teacher        "" (none) or a finished fine-tuning run on the same labeled
                                subset: its probabilities on every other training image are
                                the targets (SimCLR v2 distillation); the epochs then count
                                all training records. Placeholders {label_fraction},
                                {label_fraction_seed}, {seed} pick a sweep's run, e.g.
                                "workdirs/sw/init=simclr/frac={label_fraction:g}/seed={seed}".
  config.distill.temperature    the softmax temperature of teacher and student (1.0).

Outputs: WORKDIR/results.json (schema in remedis_jax/train_finetune.py), roc/<test set>.json,
subset_manifest.json, metrics.jsonl, TensorBoard events, checkpoints/ and best/.
"""

import ml_collections

from configs import common

VARIANTS = ("tiny", "tiny_vit", "smoke", "medmnist", "pneumoniamnist", "pneumoniamnist_tuned",
            "folder", "r50x1")
# What configs/studies/pneumoniamnist.py chose on validation (the same for scratch and SimCLR).
PNEUMONIAMNIST_TUNED = {"total_epochs": 300.0, "optimizer": {"learning_rate": 3e-3},
                        "data": {"train_ops": "random_resized_crop(28, area=(0.8, 1.0), "
                                              "aspect_ratio=(0.9, 1.1))|flip_lr"}}
RECIPES = ("hyperrule", "lars")

# MedMNIST v2 (Yang et al. 2023, Scientific Data, table of results): PneumoniaMNIST test AUC and
# ACC of the published baselines.
PNEUMONIAMNIST_BASELINES = {
    "MedMNIST v2 ResNet-18 (28)": {"macro_auc": 0.944, "accuracy": 0.854},
    "MedMNIST v2 ResNet-50 (224)": {"macro_auc": 0.962, "accuracy": 0.884},
}


def vit_tiny_recipe() -> dict:
  """What `tiny_vit` changes in `tiny`: ViT-tiny/4 with AdamW instead of the ResNet's SGD.

  With `tiny`'s SGD recipe the ViT barely learns (0.59 test macro AUC at site A with all labels,
  against 0.66 with AdamW 1e-3); the learning rates tried are in
  experiments/results/gmml_tiny/README.md. A nested dict, so sweeps can pass it as one init's
  `init_overrides`.
  """
  return {"model": {"name": "ViT-tiny/4"},
          "optimizer": {"name": "adamw", "learning_rate": 1e-3, "lr_scaling": "none",
                        "weight_decay": 0.05, "warmup_steps": 50}}


def _apply_nested(config: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict):
      _apply_nested(config[key], value)
    else:
      config[key] = value


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of `variant[,lars]` (see the module docstring)."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  variant = common.parse_variant(parts[0] if parts else None, VARIANTS, default="tiny")
  recipe = "lars" if "lars" in parts[1:] else "hyperrule"
  unknown = [p for p in parts[1:] if p not in RECIPES]
  if unknown:
    raise ValueError(f"unknown config modifier(s) {unknown}; known: {', '.join(RECIPES)}")
  from remedis_jax import optimizers  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict()
  config.trainer = "finetune"
  config.variant = variant
  config.recipe = recipe
  config.seed = 0

  config.data = common.data_config()
  config.data.train_split = "train"
  config.data.val_split = "val"     # chooses the best checkpoint and the operating thresholds
  config.data.train_ops = ""        # "" = the preset's "finetune" ops; else an op string
  config.data.eval_ops = ""         # "" = the preset's "eval" ops
  config.test_sets = ("test",)

  config.label_fraction = 1.0
  config.label_fraction_seed = 0
  config.label_fraction_stratify = True
  config.finetune_mode = "full"
  # Keeping pretrained features (train_finetune.scale_encoder_updates): the encoder's updates
  # are x0 for the first `encoder_frozen_fraction` of the steps (head only: linear probe, then
  # fine-tune) and x`encoder_lr_multiplier` after them.
  config.encoder_lr_multiplier = 1.0
  config.encoder_frozen_fraction = 0.0

  config.batch_size = 512           # global, over all devices and hosts
  config.eval_batch_size = 512
  config.total_steps = -1           # -1 and total_epochs -1: BiT-HyperRule by dataset size
  config.total_epochs = -1.0

  config.model = ml_collections.ConfigDict()
  config.model.name = "R50x1"
  config.model.init = ""
  config.model.from_head_layer = False
  config.model.head_hidden_dims = (2048, 2048)  # only [0] is used, with from_head_layer
  config.model.head_norm = "layer"
  config.model.dtype = "float32"
  config.model.remat = False
  config.model.stem = "bit"  # BiT ResNets: "bit" (7x7/2 + max-pool), "small", "small_s2"

  config.loss = ml_collections.ConfigDict({"class_weights": ""})
  # Distillation through the unlabeled training images (SimCLR v2; remedis_jax/distillation.py):
  # a finished fine-tuning run on the same labeled subset labels every other training image.
  config.distill = ml_collections.ConfigDict({"teacher": "", "temperature": 1.0})

  # BiT-HyperRule (Kolesnikov et al. 2020): SGD momentum 0.9, lr 0.003 at batch 512, no weight
  # decay. BiT decays the lr 10x at 30/60/90% of training; the shared optimiser offers cosine,
  # which we use instead. Warm-up -1: BiT-HyperRule's, scaled to the schedule length.
  config.optimizer = optimizers.default_optimizer_config()
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.0015  # x batch / 256 = 0.003 at batch 512
  config.optimizer.lr_scaling = "linear"
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_steps = -1
  config.optimizer.schedule = "cosine"
  config.optimizer.grad_clip_norm = 1.0

  config.mesh = common.mesh_config()
  config.param_sharding = "replicate"

  config.eval_every_steps = 100     # validation for best-checkpoint selection (and at the end)
  # > 0: validation at that many evenly spaced steps instead (loop.evaluation_steps), so that
  # every label fraction has the same number of candidates for the best checkpoint.
  config.num_evaluations = 0
  config.best_metric = "macro_auc"  # on data.val_split, higher is better
  config.ece_bins = 15
  config.robustness = ml_collections.ConfigDict({
      "perturbations": ("intensity_scale(0.8)", "intensity_shift(0.1)", "gamma(0.7)",
                        "gamma(1.5)", "rotate(15)", "scale(0.85)", "scale(1.15)"),
      "test_sets": ("",),           # names from config.test_sets; "" = the first one
  })
  config.baselines = ml_collections.ConfigDict()  # {name: {metric: value}}, printed beside ours

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

  if variant in ("tiny", "tiny_vit"):
    config.data.source = "synthetic"
    config.data.task = "multilabel"
    config.data.image_size = 32
    config.data.sites.train = "A"
    config.data.sites.val = "A"
    config.test_sets = ("in_distribution=test@A", "site_B=test@B", "site_C=test@C",
                        "site_D=test@D")
    config.label_fraction = 0.1
    config.batch_size = 32
    config.eval_batch_size = 128
    # From scratch R_tiny underfits for hundreds of steps (with all labels it needs ~800 to
    # reach what a pixel-space logistic regression reaches), so 800 steps (12.5 epochs of the
    # full split) and a validation every 100 steps for the best checkpoint (small fractions
    # peak after 200-600 steps).
    config.total_steps = 800
    config.optimizer.warmup_steps = 30
    # SGD momentum 0.9 at 1.0 x 32/256 = 0.125 peak: lower peaks tied, higher ones and AdamW
    # did worse at equal steps (experiments/results/quickstart/README.md).
    config.optimizer.learning_rate = 1.0
    # The cxr preset's "finetune" ops cost too much at 32 px: a 0.6 crop cuts off the
    # costophrenic angles (effusion) and the intensity jitter hides consolidation density. A
    # near-identity crop (a shift / zoom of 1-2 px) keeps the findings and still regularises
    # small label fractions (the runs: experiments/results/quickstart/README.md). The size is
    # written in at config time: with --config.data.image_size, override data.train_ops too.
    config.data.train_ops = (f"random_resized_crop({config.data.image_size}, area=(0.92, 1.0), "
                             "aspect_ratio=(0.95, 1.05))")
    config.model.name = "R_tiny"
    config.model.head_hidden_dims = (256,)
    config.eval_every_steps = 100
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    config.progress_every_secs = 15.0
  elif variant == "smoke":
    config.data.source = "synthetic"
    config.data.task = "multilabel"
    config.data.image_size = 32
    config.data.num_examples.train = 96
    config.data.num_examples.val = 32
    config.data.num_examples.test = 32
    config.data.sites.train = "A"
    config.data.sites.val = "A"
    config.test_sets = ("in_distribution=test@A", "site_C=test@C")
    config.label_fraction = 0.5
    config.batch_size = 16
    config.eval_batch_size = 16
    config.total_steps = 4
    config.optimizer.warmup_steps = 1
    config.optimizer.learning_rate = 0.1
    config.model.name = "R_micro"
    config.model.head_hidden_dims = (32,)
    config.robustness.perturbations = ("gamma(1.5)", "rotate(15)")
    config.eval_every_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.async_checkpointing = False
  elif variant in ("medmnist", "pneumoniamnist", "pneumoniamnist_tuned"):
    # MedMNIST v2 protocol: 28 px, official splits, no augmentation, Adam lr 1e-3, batch 128,
    # 100 epochs (the paper decays 10x at epochs 50 and 75; we decay with a cosine), model
    # selected on validation, test AUC and ACC. R_tiny stands in for ResNet-18 (the BiT zoo has
    # no ResNet-18); at 28 px it has ~1.5 M parameters.
    config.data.source = "medmnist"
    config.data.path = ""  # the user's file: --config.data.path=/path/to/pneumoniamnist.npz
    config.data.image_size = 28
    config.data.train_ops = "resize(28)"
    config.test_sets = ("test",)
    config.batch_size = 128
    config.eval_batch_size = 256
    config.total_epochs = 100.0
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.lr_scaling = "none"
    config.optimizer.warmup_steps = 0
    config.optimizer.grad_clip_norm = None
    config.model.name = "R_tiny"
    config.model.head_hidden_dims = (256,)
    config.robustness.perturbations = ("intensity_scale(0.8)", "gamma(0.7)", "gamma(1.5)",
                                       "rotate(10)", "scale(0.9)", "scale(1.1)")
    # 100 epochs are 31 steps with 1% of PneumoniaMNIST's labels and 3033 with all of them:
    # 20 validations per run at any fraction (every 152 steps at 100%, every 1-2 at 1%).
    config.num_evaluations = 20
    config.log_every_steps = 20
    config.checkpoint_every_steps = 500
    if variant != "medmnist":
      config.baselines = ml_collections.ConfigDict(PNEUMONIAMNIST_BASELINES)
    if variant == "pneumoniamnist_tuned":
      _apply_nested(config, PNEUMONIAMNIST_TUNED)
  elif variant == "folder":
    config.data.source = "folder"
    config.data.split_column = "split"
    config.data.image_size = 224
    config.data.num_channels = 3
    config.model.dtype = "bfloat16"
    config.data.worker_count = common.PAPER_SCALE_WORKERS
    config.eval_every_steps = 500
  elif variant == "r50x1":
    config.data.image_size = 224
    config.model.dtype = "bfloat16"
    config.data.worker_count = common.PAPER_SCALE_WORKERS
    config.eval_every_steps = 1000

  if variant == "tiny_vit":
    _apply_nested(config, vit_tiny_recipe())

  if recipe == "lars":
    # SimCLR's fine-tuning optimiser: LARS with momentum, no weight decay, cosine decay.
    config.optimizer.name = "lars"
    config.optimizer.learning_rate = 0.16 if variant not in ("tiny", "smoke") else 0.5
    config.optimizer.lr_scaling = "linear"
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = None
  return config
