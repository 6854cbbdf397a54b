"""Optimisers from a config: LARS / SGD / AdamW with schedules and path masks.

Which parameters get weight decay, which get LARS trust-ratio adaptation and
which are frozen is decided by regular expressions on the '/'-joined parameter
path (e.g. `encoder/block1/unit01/gn1/scale`), in the manner of big_vision's
`optax.py`. A regex must match the WHOLE path (`re.fullmatch`), so write
`.*bias` rather than `bias`.

SimCLR (Chen et al. 2020, appendix B.1) trains with LARS, learning rate
0.3 * batch / 256, cosine decay after a linear warm-up, weight decay 1e-6, and
excludes normalisation parameters and biases from both weight decay and the
LARS trust ratio; `default_optimizer_config()` reproduces that.

Linear evaluation freezes the encoder: frozen parameters get exactly zero
updates and carry no optimiser state (`optax.partition` + `optax.set_to_zero`),
so an AdamW on the head of a frozen R152x3 does not allocate two encoder-sized
moment buffers.
"""

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import ml_collections
import numpy as np
import optax

PyTree = Any
Schedule = Callable[[Union[int, jax.Array]], jax.Array]

OPTIMIZER_NAMES = ("lars", "sgd", "adamw")
SCHEDULE_NAMES = ("cosine", "constant", "linear")
LR_SCALING_NAMES = ("linear", "sqrt", "none")

# Parameters directly under a module whose name contains "norm" or "gn" (any
# case): flax `GroupNorm_0/scale`, `LayerNorm_0/bias`, BiT `gn1/scale`,
# `norm_pre_head/bias`.
NORM_PARAMS_REGEX = r"(?i)(.*/)?[^/]*(norm|gn)[^/]*/[^/]+"
# Every bias, at any depth (`Dense_0/bias`, `head/bias`, a top-level `bias`).
BIAS_PARAMS_REGEX = r"(.*/)?bias"
NORM_AND_BIAS_REGEXES = (NORM_PARAMS_REGEX, BIAS_PARAMS_REGEX)


def default_optimizer_config() -> ml_collections.ConfigDict:
  """SimCLR's pretraining optimiser: LARS, lr 0.3 x batch/256, cosine, wd 1e-6.

  Returns:
    A ConfigDict with every field `make_optimizer` reads:
      name: 'lars' | 'sgd' | 'adamw'.
      learning_rate: base learning rate, before `lr_scaling`.
      lr_scaling: 'linear' (lr * batch / 256), 'sqrt' (lr * sqrt(batch), the
        SimCLR small-batch rule, used with a base lr around 0.075), 'none'.
      warmup_steps: linear warm-up from 0 to the peak; the trainer converts
        epochs to steps once and writes them here.
      schedule: 'cosine' | 'constant' | 'linear' decay after warm-up.
      end_lr_factor: final lr as a fraction of the peak ('cosine', 'linear').
      momentum, nesterov: heavy-ball momentum for 'lars' and 'sgd'.
      weight_decay: coupled L2 for 'lars'/'sgd' (added to the gradient before
        the trust ratio, as in SimCLR); decoupled for 'adamw'.
      weight_decay_end: None (constant weight decay, the default) or the
        final value of a cosine weight-decay schedule from `weight_decay` at
        update 0 to this at the last update ('adamw' and 'sgd'; DINO / GMML
        ramp 0.04 -> 0.4 for ViTs).
      weight_decay_exclude: regexes of params that get no weight decay.
      lars_exclude: regexes of params that skip the LARS trust ratio.
      trust_coefficient: LARS eta.
      frozen: regexes of params that get zero updates and no optimiser state.
      grad_clip_norm: None, or the global gradient norm to clip to (computed
        over trainable params only).
      b1, b2, eps: AdamW moments.
  """
  config = ml_collections.ConfigDict()
  config.name = "lars"
  config.learning_rate = 0.3
  config.lr_scaling = "linear"
  config.warmup_steps = 0
  config.schedule = "cosine"
  config.end_lr_factor = 0.0
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-6
  # A typed placeholder (None, but a float may be set), so --config.optimizer.weight_decay_end
  # works on the command line.
  config.weight_decay_end = ml_collections.config_dict.placeholder(float)
  config.weight_decay_exclude = NORM_AND_BIAS_REGEXES
  config.lars_exclude = NORM_AND_BIAS_REGEXES
  config.trust_coefficient = 0.001
  config.frozen = ()
  config.grad_clip_norm = None
  config.b1 = 0.9
  config.b2 = 0.999
  config.eps = 1e-8
  return config


# ---------------------------------------------------------------------------
# Parameter-path masks.


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def param_path(key_path: Sequence[Any]) -> str:
  """The '/'-joined name of a leaf from its `jax.tree_util` key path."""
  return "/".join(_key_name(k) for k in key_path)


def _compile_regexes(regexes: Union[str, Sequence[str], None], field: str) -> list[re.Pattern]:
  if regexes is None:
    return []
  if isinstance(regexes, str):
    regexes = (regexes,)
  compiled = []
  for regex in regexes:
    try:
      compiled.append(re.compile(regex))
    except re.error as error:
      raise ValueError(f"optimizer config {field}: invalid regex {regex!r}: {error}") from None
  return compiled


def param_path_mask(params: PyTree, regexes: Union[str, Sequence[str], None]) -> PyTree:
  """Marks the leaves whose '/'-joined path fully matches any of the regexes.

  Args:
    params: a pytree of arrays (or `jax.ShapeDtypeStruct`s), usually nested
      dicts of flax module names.
    regexes: one regex or a sequence of them, matched with `re.fullmatch`
      against paths like `encoder/root_block/conv/kernel`. None or empty marks
      nothing.

  Returns:
    A pytree of Python bools with the structure of `params`.

  Raises:
    ValueError: if a regex does not compile.
  """
  compiled = _compile_regexes(regexes, "param_path_mask regexes")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(r.fullmatch(param_path(path)) for r in compiled), params)


def _invert(mask: PyTree) -> PyTree:
  return jax.tree.map(lambda m: not m, mask)


def _all_param_paths(params: PyTree) -> list[str]:
  return [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _check_frozen_regexes_match(params: PyTree, frozen: Sequence[str]) -> None:
  """A frozen regex that matches nothing is almost surely a typo: fail loudly."""
  paths = _all_param_paths(params)
  for regex in _compile_regexes(frozen, "frozen"):
    if not any(regex.fullmatch(p) for p in paths):
      examples = ", ".join(paths[:5]) + (", ..." if len(paths) > 5 else "")
      raise ValueError(
          f"optimizer config frozen: regex {regex.pattern!r} matches no parameter "
          f"(regexes must match the whole '/'-joined path); paths look like: {examples}")


# ---------------------------------------------------------------------------
# Config resolution and learning-rate schedule.


def _resolve_config(config: Union[ml_collections.ConfigDict, dict]) -> ml_collections.ConfigDict:
  """Defaults overlaid with `config`; unknown fields and bad values are errors."""
  resolved = default_optimizer_config()
  given = dict(config.items()) if config is not None else {}
  unknown = sorted(set(given) - set(resolved.keys()))
  if unknown:
    hint = ""
    if "warmup_epochs" in unknown:
      hint = (" (warmup_epochs: the trainer converts it once, "
              "warmup_steps = round(warmup_epochs * steps_per_epoch), and drops it)")
    raise ValueError(
        f"optimizer config has unknown field(s) {unknown}{hint}; "
        f"valid fields are: {', '.join(sorted(resolved.keys()))}")
  for key, value in given.items():
    resolved[key] = value

  def check_choice(field, valid):
    if resolved[field] not in valid:
      raise ValueError(
          f"optimizer config {field}={resolved[field]!r} is unknown; "
          f"valid values are: {', '.join(repr(v) for v in valid)}")

  check_choice("name", OPTIMIZER_NAMES)
  check_choice("schedule", SCHEDULE_NAMES)
  check_choice("lr_scaling", LR_SCALING_NAMES)
  if resolved.warmup_steps < 0:
    raise ValueError(f"optimizer config warmup_steps must be >= 0; got {resolved.warmup_steps}.")
  if resolved.end_lr_factor < 0:
    raise ValueError(f"optimizer config end_lr_factor must be >= 0; got {resolved.end_lr_factor}.")
  if resolved.weight_decay_end is not None:
    if resolved.weight_decay_end < 0:
      raise ValueError("optimizer config weight_decay_end must be None or >= 0; got "
                       f"{resolved.weight_decay_end}.")
    if resolved.name == "lars":
      raise ValueError("optimizer config weight_decay_end (a weight-decay schedule) is not "
                       "supported with name='lars' (optax.lars takes a constant); use "
                       "'adamw' or 'sgd', or set weight_decay_end=None.")
  if resolved.grad_clip_norm is not None and resolved.grad_clip_norm <= 0:
    raise ValueError(
        f"optimizer config grad_clip_norm must be None or > 0; got {resolved.grad_clip_norm}.")
  return resolved


def _peak_learning_rate(config: ml_collections.ConfigDict, batch_size: int) -> float:
  if config.lr_scaling == "linear":
    return config.learning_rate * batch_size / 256.0
  if config.lr_scaling == "sqrt":
    return config.learning_rate * math.sqrt(batch_size)
  return float(config.learning_rate)


def _make_schedule(config: ml_collections.ConfigDict, peak_lr: float, total_steps: int) -> Schedule:
  """Linear warm-up from 0 over `warmup_steps`, then cosine / linear decay to
  `peak_lr * end_lr_factor` at `total_steps`, or constant (optax's schedules, joined)."""
  warmup_steps = int(config.warmup_steps)
  end_lr = peak_lr * config.end_lr_factor
  decay_steps = max(total_steps - warmup_steps, 1)
  if config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=config.end_lr_factor)
  elif config.schedule == "linear":
    decay = optax.linear_schedule(peak_lr, end_lr, decay_steps)
  else:  # constant
    decay = optax.constant_schedule(peak_lr)
  if warmup_steps == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps), decay],
                              boundaries=[warmup_steps])


def make_weight_decay_schedule(config: Union[ml_collections.ConfigDict, dict],
                               total_steps: int) -> Union[float, Schedule]:
  """The weight decay: a constant, or a cosine from `weight_decay` to `weight_decay_end`.

  The cosine runs over all `total_steps` updates without warm-up (DINO's and GMML's
  `cosine_scheduler(wd, wd_end, epochs, iters)`): update k uses
  end + (start - end) * (1 + cos(pi * k / (total_steps - 1))) / 2.

  Args:
    config: optimiser config (fields as in `default_optimizer_config()`).
    total_steps: number of optimiser updates in the run.

  Returns:
    A float (weight_decay_end is None) or `schedule(step) -> weight decay`.
  """
  config = _resolve_config(config)
  start = float(config.weight_decay)
  if config.weight_decay_end is None:
    return start
  end = float(config.weight_decay_end)
  horizon = max(int(total_steps) - 1, 1)
  if start == 0.0:  # optax's cosine decays from its initial value: rise as end - decay(end)
    rise = optax.cosine_decay_schedule(end, horizon)
    return lambda step: end - rise(step)
  return optax.cosine_decay_schedule(start, horizon, alpha=end / start)


# ---------------------------------------------------------------------------
# The optimiser.


def from_run_config(config: ml_collections.ConfigDict, *, total_steps: int, warmup_steps: int,
                    frozen: Sequence[str] = ()):
  """(tx, schedule, resolved optimiser config) for a run config, the warm-up given in steps.

  The trainers convert durations once (epochs -> steps, by their data's size); this drops
  `warmup_epochs`, sets `warmup_steps`, and adds the trainer's `frozen` regexes (a linear
  probe's encoder) to `config.optimizer.frozen`.
  """
  opt_config = config.optimizer.copy_and_resolve_references()
  with opt_config.unlocked():
    opt_config.warmup_steps = warmup_steps
    if "warmup_epochs" in opt_config:
      del opt_config["warmup_epochs"]
    if frozen:
      opt_config.frozen = tuple(opt_config.get("frozen", ())) + tuple(frozen)
  tx, schedule = make_optimizer(opt_config, total_steps=total_steps,
                                batch_size=config.batch_size)
  return tx, schedule, opt_config


def make_optimizer(
    config: Union[ml_collections.ConfigDict, dict],
    *,
    total_steps: int,
    batch_size: int,
) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optimiser and its learning-rate schedule from a config.

  The chain is: global-norm clipping (optional) -> weight decay (masked) ->
  LARS trust ratio (masked, 'lars' only) -> learning rate -> momentum, all
  applied only to trainable parameters; frozen ones get zero updates. Update
  k (counting from 0) uses `schedule(k)`, so with warm-up the first update is
  zero, as in SimCLR and big_vision.

  Args:
    config: fields as in `default_optimizer_config()`; missing fields take
      those defaults.
    total_steps: number of optimiser updates in the run (decay horizon).
    batch_size: GLOBAL batch size (images, not views), for `lr_scaling`.

  Returns:
    (tx, schedule): an optax GradientTransformation (its `update` needs
    `params`) and `schedule(step) -> learning rate` for logging.

  Raises:
    ValueError: unknown optimiser / schedule / scaling name or config field,
      invalid regex, warmup_steps > total_steps, non-positive sizes; at
      `tx.init`, a `frozen` regex that matches no parameter.
  """
  config = _resolve_config(config)
  if total_steps < 1:
    raise ValueError(f"make_optimizer: total_steps must be >= 1; got {total_steps}.")
  if batch_size < 1:
    raise ValueError(f"make_optimizer: batch_size must be >= 1; got {batch_size}.")
  if config.warmup_steps > total_steps:
    raise ValueError(
        f"optimizer config warmup_steps={config.warmup_steps} exceeds total_steps={total_steps}.")
  # Compile now so a bad regex fails at construction, not at the first update.
  for field in ("weight_decay_exclude", "lars_exclude", "frozen"):
    _compile_regexes(config[field], field)

  schedule = _make_schedule(config, _peak_learning_rate(config, batch_size), total_steps)
  weight_decay_exclude = tuple(config.weight_decay_exclude)
  lars_exclude = tuple(config.lars_exclude)
  # Masks are functions of the tree, so they also work on the partially masked
  # trees optax.partition hands to the trainable branch.
  weight_decay_mask = lambda tree: _invert(param_path_mask(tree, weight_decay_exclude))
  lars_mask = lambda tree: _invert(param_path_mask(tree, lars_exclude))

  if config.name == "lars":
    tx = optax.lars(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        weight_decay_mask=weight_decay_mask,
        trust_coefficient=config.trust_coefficient,
        trust_ratio_mask=lars_mask,
        momentum=config.momentum,
        nesterov=config.nesterov,
    )
  elif config.name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(make_weight_decay_schedule(config, total_steps),
                                  mask=weight_decay_mask),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    )
  else:  # adamw
    # optax.adamw (0.2.8) takes a schedule for weight_decay: decoupled decay
    # lr(k) * wd(k) * p, as PyTorch's AdamW with DINO/GMML's per-step wd schedule.
    tx = optax.adamw(
        schedule, b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=make_weight_decay_schedule(config, total_steps), mask=weight_decay_mask)

  if config.grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)

  frozen = tuple(config.frozen)
  if frozen:
    def labels(tree):
      _check_frozen_regexes_match(tree, frozen)
      return jax.tree.map(
          lambda is_frozen: "frozen" if is_frozen else "trainable", param_path_mask(tree, frozen))
    tx = optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def describe_masks(params: PyTree, config: Union[ml_collections.ConfigDict, dict]) -> str:
  """A table of which parameters get weight decay, LARS adaptation, or are frozen.

  Meant for the start-of-run log, so a wrong regex is visible before hours of
  training.

  Args:
    params: the params pytree (arrays or `jax.ShapeDtypeStruct`s).
    config: the optimiser config (as for `make_optimizer`).

  Returns:
    A multi-line string: one row per parameter (path, shape, weight decay,
    LARS, frozen), then a summary of parameter counts.

  Raises:
    ValueError: as `make_optimizer` for bad config fields or frozen regexes.
  """
  config = _resolve_config(config)
  frozen = tuple(config.frozen)
  if frozen:
    _check_frozen_regexes_match(params, frozen)
  uses_lars = config.name == "lars"
  decayed = _invert(param_path_mask(params, config.weight_decay_exclude))
  adapted = _invert(param_path_mask(params, config.lars_exclude))
  is_frozen = param_path_mask(params, frozen)

  rows = []
  counts = {"total": 0, "decay": 0, "lars": 0, "frozen": 0}
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, leaf), wd, lars, fr in zip(
      flat, jax.tree.leaves(decayed), jax.tree.leaves(adapted), jax.tree.leaves(is_frozen)):
    shape = tuple(np.shape(leaf))
    size = int(np.prod(shape)) if shape else 1
    counts["total"] += size
    if fr:
      counts["frozen"] += size
      wd_text, lars_text = "-", "-"
    else:
      wd_text = "yes" if wd and config.weight_decay else "no"
      lars_text = ("yes" if lars else "no") if uses_lars else "-"
      counts["decay"] += size if wd_text == "yes" else 0
      counts["lars"] += size if lars_text == "yes" else 0
    rows.append((param_path(path), str(shape), wd_text, lars_text, "yes" if fr else "no"))

  header = ("parameter", "shape", f"weight_decay={config.weight_decay:g}", "lars", "frozen")
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  lines = [f"optimizer {config.name}: parameter masks", line(header),
           line(["-" * w for w in widths])]
  lines += [line(r) for r in rows]
  lines.append(
      f"{counts['total']:,} parameters: weight decay on {counts['decay']:,}, "
      f"LARS on {counts['lars']:,}, frozen {counts['frozen']:,}, "
      f"trainable {counts['total'] - counts['frozen']:,}")
  return "\n".join(lines)
