"""`--format=timm` and the timm loader, checked against timm itself (PyTorch, CPU).

A tiny BiT-stem model (R_micro) goes through the real exporter to a timm ResNetV2 built from
the export's own config.json; timm's outputs on the same uint8 images must be the JAX model's.
The other direction starts from weights timm initialised itself.

PyTorch and timm are imported inside the functions, not at collection: every
pytest-xdist worker collects every module, and importing timm (torchvision) after TensorFlow
aborts the process (two LLVMs' command-line options), besides costing ~10 s a worker.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import timm_parity
from remedis_jax import export, initialization, models
from remedis_jax.models import bit, bit_timm
from tests.fakes import fake_run_workdir, max_relative_difference
from tests.fakes import random_bit_params as random_encoder

CLASS_NAMES = ["normal", "effusion", "nodule"]
SIZE = 64


def timm_model(config):
  """The timm model an export's config.json describes: its registered name, or ResNetV2 built
  from the recorded constructor arguments."""
  import timm  # pylint: disable=g-import-not-at-top
  if config["architecture"]:
    return timm.create_model(config["architecture"], pretrained=False,
                             num_classes=config["num_classes"], **config["model_args"])
  return timm_parity.from_constructor(config)


def timm_input(images, config):
  """uint8 NHWC -> what timm takes, with the mean and std the export's config.json names."""
  import torch  # pylint: disable=g-import-not-at-top
  cfg = config["pretrained_cfg"]
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
  std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
  return (x - mean) / std


def test_finetuned_export_gives_timm_the_same_features_and_logits(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  encoder = random_encoder("R_micro")
  rng = np.random.default_rng(1)
  classifier = {"kernel": rng.normal(0, 0.1, (256, 3)).astype(np.float32),
                "bias": rng.normal(0, 0.1, (3,)).astype(np.float32)}
  metrics = {"macro_auc": 0.75, "accuracy": 0.5}
  results = {"task": {"num_classes": 3, "multi_label": False, "class_names": CLASS_NAMES},
             "test_sets": {"test": {"metrics": metrics}}, "num_train_labels": 40}
  workdir = fake_run_workdir(tmp_path / "run", {"encoder": encoder, "classifier": classifier},
                             data={"image_size": SIZE, "path": "/data/cxr.npz"},
                             results=results)
  out = str(tmp_path / "timm")
  export.export_workdir(workdir, out, export_format="timm")

  config = json.loads((tmp_path / "timm" / export.TIMM_CONFIG_FILE).read_text())
  model = timm_model(config).eval()
  state = safetensors.torch.load_file(str(tmp_path / "timm" / export.TIMM_WEIGHTS_FILE))
  loaded = model.load_state_dict(state, strict=True)
  assert not loaded.missing_keys and not loaded.unexpected_keys

  images = np.random.default_rng(2).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
  with torch.no_grad():
    x = timm_input(images, config)
    timm_features = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    timm_logits = model(x).numpy()
  _, intermediates = models.create_model("R_micro").apply(
      {"params": encoder}, images.astype(np.float32) / 127.5 - 1.0)
  features = np.asarray(intermediates["pre_logits"])
  logits = features @ classifier["kernel"] + classifier["bias"]
  assert max_relative_difference(timm_features, features) <= 1e-4
  assert max_relative_difference(timm_logits, logits) <= 1e-4

  # Metadata travels with the weights: timm's label names, our task, metrics and data.
  assert config["label_names"] == CLASS_NAMES
  assert config["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]
  meta = config["remedis_jax"]
  assert meta["test_metrics"] == {"test": metrics}
  assert meta["training_data"]["path"] == "/data/cxr.npz"
  assert meta["input"]["image_size"] == SIZE and meta["model_name"] == "R_micro"
  with safetensors.safe_open(str(tmp_path / "timm" / export.TIMM_WEIGHTS_FILE), "pt") as f:
    assert json.loads(f.metadata()["remedis_jax"])["task"]["class_names"] == CLASS_NAMES


def tiny_timm_twin(num_classes):
  """timm's own R_micro-shaped BiT ResNetV2, with timm's initialisation."""
  import torch  # pylint: disable=g-import-not-at-top
  from timm.layers import GroupNormAct, StdConv2d  # pylint: disable=g-import-not-at-top
  from timm.models.resnetv2 import ResNetV2  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = ResNetV2(layers=[1, 1, 1, 1], channels=(32, 64, 128, 256), stem_chs=8,
                   stem_type="fixed", conv_layer=functools.partial(StdConv2d, eps=1e-8),
                   norm_layer=functools.partial(GroupNormAct, num_groups=4),
                   num_classes=num_classes)
  with torch.no_grad():  # timm initialises GroupNorm to (1, 0); move away from that
    for name, value in model.named_parameters():
      if value.ndim == 1:
        value.add_(torch.randn_like(value) * 0.2)
  return model.eval()


def test_timm_weights_load_into_jax_and_round_trip_exactly(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  model = tiny_timm_twin(num_classes=3)
  path = str(tmp_path / "model.safetensors")
  safetensors.torch.save_file(model.state_dict(), path)

  name, encoder, classifier = bit_timm.load_timm_bit(path, keep_head=True)
  assert name == "R_micro"
  back = bit_timm.to_timm_state_dict(encoder, classifier)
  original = {k: v.numpy() for k, v in model.state_dict().items()}
  assert back.keys() == original.keys()
  assert all(np.array_equal(back[k], original[k]) for k in original)

  images = np.random.default_rng(3).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  with torch.no_grad():
    expected = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).numpy()
  _, intermediates = models.create_model("R_micro").apply(
      {"params": encoder}, images.astype(np.float32) / 127.5 - 1.0)
  logits = np.asarray(intermediates["pre_logits"]) @ classifier["kernel"] + classifier["bias"]
  assert max_relative_difference(logits, expected) <= 1e-4

  # config.model.init=<file>.safetensors: REMEDIS stage 1 from timm weights (head dropped).
  loaded = initialization.load_init(path, "R_micro")
  assert loaded.description.startswith("timm BiT weights")
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded.encoder, encoder))


def test_loader_names_wrong_keys_shapes_and_model(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  state = tiny_timm_twin(num_classes=0).state_dict()
  state.pop("stages.1.blocks.0.conv2.weight")
  state["norm.weight"] = torch.ones(5)
  state["extra.weight"] = torch.zeros(1)
  path = str(tmp_path / "bad.safetensors")
  safetensors.torch.save_file(state, path)
  with pytest.raises(ValueError) as error:
    bit_timm.load_timm_bit(path)
  message = str(error.value)
  assert path in message
  assert "missing key stages.1.blocks.0.conv2.weight: expected shape (16, 16, 3, 3)" in message
  assert "unexpected key extra.weight" in message
  assert "shape mismatch norm.weight: file has (5,), R_micro expects (256,)" in message

  good = str(tmp_path / "good.safetensors")
  safetensors.torch.save_file(tiny_timm_twin(num_classes=0).state_dict(), good)
  with pytest.raises(ValueError, match="timm BiT weights of our R_micro, but "
                                       "config.model.name='R_tiny'"):
    initialization.load_init(good, "R_tiny")
  with pytest.raises(ValueError, match="stem='small'; set --config.model.stem=bit"):
    initialization.load_init(good, "R_micro", stem="small")


@pytest.mark.parametrize("name", sorted(bit_timm.TIMM_NAMES))
def test_every_named_twin_has_timm_keys_and_shapes(name):
  """Our key mapping, for every zoo model timm registers, against timm's own state_dict
  (built on the meta device: shapes without memory)."""
  import timm  # pylint: disable=g-import-not-at-top
  model = timm.create_model(bit_timm.TIMM_NAMES[name], pretrained=False, num_classes=10,
                            device="meta")
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert bit_timm.expected_timm_shapes(name, num_classes=10) == theirs
  abstract = jax.eval_shape(models.create_model(name).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  assert bit_timm.timm_twin(name, "bit", abstract)["architecture"] == bit_timm.TIMM_NAMES[name]


def test_r50x1_export_loads_by_name_and_from_the_folder(tmp_path):
  import timm  # pylint: disable=g-import-not-at-top
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  encoder = random_encoder("R50x1", seed=4)
  metadata = {"model_name": "R50x1", "stem": "bit",
              "input": {"image_size": 224, "num_channels": 3}}
  out = str(tmp_path / "r50")
  export.write_timm_export(out, {"encoder": encoder}, metadata)
  by_name = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=0)
  result = by_name.load_state_dict(
      safetensors.torch.load_file(f"{out}/{export.TIMM_WEIGHTS_FILE}"), strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  from_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
  assert from_folder.num_classes == 0
  assert list(from_folder.pretrained_cfg["mean"]) == [0.5, 0.5, 0.5]
  expected = encoder["block3"]["unit02"]["conv2"]["kernel"].transpose(3, 2, 0, 1)
  assert np.array_equal(from_folder.stages[2].blocks[1].conv2.weight.detach().numpy(), expected)


def test_bit_variants_table_matches_timm_names():
  # Every timm name is a zoo variant with BiT's 32 groups; the rest of the zoo is documented
  # (docs/export.md) as built from constructor arguments.
  assert set(bit_timm.TIMM_NAMES) <= set(bit.VARIANTS)
  assert all(bit.VARIANTS[n]["num_groups"] == 32 for n in bit_timm.TIMM_NAMES)
