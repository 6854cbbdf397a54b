"""Where a new run's encoder weights come from (`config.model.init`).

The resume order is spelled out in each trainer:
  1. a checkpoint in the run's own workdir (the run was interrupted: continue it exactly);
  2. `config.model.init`: a BiT `.npz` or timm BiT `.safetensors` file (REMEDIS stage 1), an
     export folder, or another run's workdir (e.g. fine-tuning from a SimCLR pretraining run:
     REMEDIS stage 3);
  3. otherwise random initialisation ("scratch").
"""

from __future__ import annotations

from typing import Any, NamedTuple

from data_pipelines import storage

from remedis_jax import checkpointing, export

SCRATCH = ("", "none", "scratch")


class LoadedInit(NamedTuple):
  """Parameters read from `config.model.init`, as host numpy arrays."""
  description: str
  encoder: dict[str, Any]
  head: dict[str, Any] | None


def load_init(init: str | None, model_name: str, stem: str = "bit") -> LoadedInit | None:
  """Reads the encoder (and projection head, where present) named by `config.model.init`.

  Args:
    init: "" / "none" / "scratch", a BiT `.npz` path, a timm BiT `.safetensors` path (e.g.
      timm's resnetv2_50x1_bit weights, or a --format=timm export's model.safetensors), an export
      folder, or a training workdir.
    model_name: the variant the run builds; a BiT file or export of another variant is an error.
    stem: the root the run builds (`config.model.stem`). Weights trained with another stem are
      an error naming both stems: "small" and "small_s2" have the same parameter shapes, so
      they would otherwise load silently, and "bit" vs the others would fail as a bare shape
      mismatch of the root kernel.

  Returns:
    None for scratch, else the loaded parameters.

  Raises:
    FileNotFoundError: the path does not exist or holds nothing loadable.
    ValueError: the weights are for a different model variant or stem.
  """
  from remedis_jax.models import bit  # pylint: disable=g-import-not-at-top
  if init is None or str(init).strip().lower() in SCRATCH:
    return None
  bit.check_stem(stem)
  init = str(init)
  if init.endswith(".npz"):
    if not storage.isfile(init):
      raise FileNotFoundError(f"config.model.init: BiT checkpoint {init} does not exist")
    name, params = bit.load_bit_npz(init, model_name=None, keep_head=False, stem=stem)
    if name != model_name:
      raise ValueError(f"config.model.init={init} holds BiT {name} weights, but "
                       f"config.model.name={model_name!r}; set config.model.name={name!r}")
    return LoadedInit(f"BiT weights {init}", params, None)
  if init.endswith(".safetensors"):
    from remedis_jax.models import bit_timm  # pylint: disable=g-import-not-at-top
    name, params, _ = bit_timm.load_timm_bit(init, model_name=None, stem=stem)
    if name != model_name:
      raise ValueError(f"config.model.init={init} holds timm BiT weights of our {name}, but "
                       f"config.model.name={model_name!r}; set config.model.name={name!r}")
    return LoadedInit(f"timm BiT weights {init}", params, None)
  if not storage.exists(init):
    raise FileNotFoundError(f"config.model.init={init} does not exist (expected a BiT .npz, a "
                            "timm .safetensors, an export folder with model.json, or a training "
                            "workdir)")
  if export.is_export(init):
    metadata, params = export.load_export(init)
    if metadata["model_name"] != model_name:
      raise ValueError(f"config.model.init={init} is an export of {metadata['model_name']}, but "
                       f"config.model.name={model_name!r}")
    _check_stem(f"config.model.init={init} is an export", export.export_stem(metadata), stem)
    _check_root_kernel(init, params["encoder"], stem)
    return LoadedInit(f"export {init} (step {metadata.get('step')})", params["encoder"],
                      params.get("head"))
  recorded = _workdir_config(init)
  if recorded is not None:
    _check_model_name(init, recorded, model_name)
    _check_stem(f"config.model.init={init} is a workdir", recorded.get("stem", "bit"), stem)
  params, step = checkpointing.load_params(init)
  if "encoder" not in params:
    raise ValueError(f"config.model.init={init}: the checkpoint has no 'encoder' parameters; "
                     f"top-level keys are {sorted(params)}")
  _check_root_kernel(init, params["encoder"], stem)
  return LoadedInit(f"workdir {init} (step {step})", params["encoder"], params.get("head"))


def _check_stem(what: str, source_stem: str, stem: str) -> None:
  if source_stem != stem:
    raise ValueError(f"{what} of a model with stem {source_stem!r}, but this run's "
                     f"config.model.stem={stem!r}; set --config.model.stem={source_stem} to "
                     f"load it (or pick an init trained with stem {stem!r})")


def _check_model_name(init: str, recorded: dict[str, Any], model_name: str) -> None:
  """A workdir of another architecture is refused before its checkpoint is read: otherwise the
  error would be merge_params' list of every unmatched parameter, which names neither model."""
  theirs = recorded.get("name")
  if theirs is not None and theirs != model_name:
    raise ValueError(f"config.model.init={init} is a workdir whose model is {theirs} "
                     f"(model.name in {recorded['config_file']}), but this run builds "
                     f"config.model.name={model_name!r}; set --config.model.name={theirs} to "
                     f"fine-tune it (or pick an init trained as {model_name})")


def _workdir_config(workdir: str) -> dict[str, Any] | None:
  """The `model` block of a training workdir's config.json, with "config_file" (its path) added;
  None: no such file (e.g. a bare checkpoint folder)."""
  workdir = storage.absolute(workdir).rstrip("/")
  candidates = [workdir]
  if storage.basename(workdir) == checkpointing.CHECKPOINT_SUBDIR:  # the checkpoints/ folder
    candidates.append(storage.dirname(workdir))
  for folder in candidates:
    path = storage.join(folder, export.RUN_CONFIG_FILE)
    if storage.isfile(path):
      return dict(storage.read_json(path).get("model", {}), config_file=path)
  return None


def _check_root_kernel(init: str, encoder: dict[str, Any], stem: str) -> None:
  """The root kernel's size must be the stem's: the check for inits that record no stem."""
  from remedis_jax.models import bit  # pylint: disable=g-import-not-at-top
  kernel = encoder.get("root_block", {}).get("conv_root", {}).get("kernel")
  if kernel is None:  # a ViT
    return
  size, expected = kernel.shape[0], bit.STEMS[stem]["kernel_size"]
  if size != expected:
    stems = [s for s, spec in bit.STEMS.items() if spec["kernel_size"] == size]
    fix = (f"set --config.model.stem={stems[0]} to load it" if len(stems) == 1 else
           f"set --config.model.stem to the one it was trained with ({' or '.join(stems)})")
    raise ValueError(f"config.model.init={init}: the encoder's root kernel is {size}x{size} "
                     f"(stem {' or '.join(repr(s) for s in stems) or 'unknown'}), but this run's "
                     f"config.model.stem={stem!r} needs {expected}x{expected}; {fix}")
