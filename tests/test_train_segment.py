"""Segmentation trainer: loss vs NumPy, config checks, and an end-to-end smoke run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import segment as segment_config
from remedis_jax import checkpointing, main as main_lib, train_segment


def _np_loss(logits, masks, dice_weight):
  probs = 1.0 / (1.0 + np.exp(-logits))
  bce = np.mean(-(masks * np.log(probs) + (1 - masks) * np.log(1 - probs)))
  intersection = (probs * masks).sum(axis=(1, 2))
  sizes = probs.sum(axis=(1, 2)) + masks.sum(axis=(1, 2))
  soft_dice = np.mean(1 - (2 * intersection + 1) / (sizes + 1))
  predicted = logits >= 0
  hard = []
  for p, m in zip(predicted, masks.astype(bool)):
    denominator = p.sum() + m.sum()
    hard.append(1.0 if denominator == 0 else 2 * (p & m).sum() / denominator)
  return bce + dice_weight * soft_dice, bce, soft_dice, np.mean(hard)


def test_segmentation_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 5)).astype(np.float32) * 2
  masks = (rng.random((3, 6, 5)) < 0.4).astype(np.uint8)
  masks[2] = 0
  logits[2] = -np.abs(logits[2])  # empty mask and empty prediction: hard Dice 1
  loss, metrics = train_segment.segmentation_loss(jnp.asarray(logits), jnp.asarray(masks), 0.7)
  expected = _np_loss(logits.astype(np.float64), masks.astype(np.float64), 0.7)
  np.testing.assert_allclose(float(loss), expected[0], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["bce"]), expected[1], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["soft_dice_loss"]), expected[2], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["dice"]), expected[3], rtol=1e-6)


def test_config_checks_name_the_key(tmp_path):
  config = segment_config.get_config("smoke")
  config.label_fraction = 0.0
  with pytest.raises(ValueError, match="config.label_fraction"):
    train_segment.check_config(config)
  config = segment_config.get_config("smoke")
  config.model.init = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="config.model.init"):
    train_segment.check_config(config)
  config = segment_config.get_config("smoke")
  config.freeze_encoder = True
  with pytest.raises(ValueError, match="freeze_encoder"):
    train_segment.check_config(config)


def test_every_variant_builds_and_names_the_segment_trainer():
  for variant in segment_config.VARIANTS:
    config = segment_config.get_config(variant)
    assert main_lib.TRAINERS[config.trainer] == "remedis_jax.train_segment"
  with pytest.raises(ValueError, match="unknown config variant"):
    segment_config.get_config("huge")


def test_require_masks_names_the_fix():
  class NoMasks:
    name = "folder/train"

    def __len__(self):
      return 1

    def __getitem__(self, index):
      return {"image": np.zeros((4, 4, 1), np.uint8), "label": np.int32(0)}

  with pytest.raises(ValueError, match="mask_column"):
    train_segment.require_masks(NoMasks(), "data.train_split='train'")


def test_smoke_run_writes_results_then_init_from_it_with_frozen_encoder(tmp_path):
  config = segment_config.get_config("smoke")
  # One device (as the folder-source run below, which reuses these compiled programs); the
  # segmentation evaluator on 8 devices: tests/test_monitor_sampling.py.
  config.mesh.devices = 1
  workdir = str(tmp_path / "scratch")
  results = train_segment.train_and_evaluate(config, workdir)

  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    on_disk = json.load(f)
  assert on_disk["format"] == train_segment.RESULTS_FORMAT and on_disk["finished"]
  assert on_disk["steps"] == config.total_steps
  assert on_disk["initialisation"] == "scratch"
  assert on_disk["num_train_masks"] == 32  # half of the 64 training records
  assert set(on_disk["test_sets"]) == {"in_distribution", "site_C"}
  for name, entry in on_disk["test_sets"].items():
    metrics = entry["metrics"]
    assert metrics["num_examples"] == config.data.num_examples.test
    for key in ("dice", "iou", "dice_global", "iou_global"):
      assert 0.0 <= metrics[key] <= 1.0
    assert metrics["iou"] <= metrics["dice"] + 1e-12  # IoU <= Dice image by image
    assert os.path.isfile(os.path.join(workdir, entry["figure"]))
  assert entry["sites"] == "C"
  assert on_disk["best"]["metric"] == "dice" and on_disk["best"]["step"] in (2, 4)
  manifest = json.load(open(os.path.join(workdir, "subset_manifest.json"), encoding="utf-8"))
  assert len(json.dumps(manifest)) > 0
  assert results["test_sets"].keys() == on_disk["test_sets"].keys()
  # A finished run returns its results without training again.
  assert train_segment.train_and_evaluate(config, workdir) == on_disk

  # Initialise from the first run's workdir and train the decoder only: the encoder must come
  # out bit-identical to the first run's final encoder, the decoder must change.
  first_params, _ = checkpointing.load_params(workdir)
  config = segment_config.get_config("smoke")
  config.mesh.devices = 1
  config.model.init = workdir
  config.freeze_encoder = True
  config.test_sets = ("in_distribution=test@A",)
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.num_figure_examples = 0
  second = str(tmp_path / "from_first")
  results = train_segment.train_and_evaluate(config, second)
  assert results["initialisation"].startswith(f"workdir {workdir}")
  assert results["test_sets"]["in_distribution"]["figure"] is None
  second_params, _ = checkpointing.load_params(second)
  jax.tree.map(np.testing.assert_array_equal, second_params["encoder"], first_params["encoder"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                         second_params["decoder"], first_params["decoder"]))
  assert any(changed)


def test_study_outputs_from_hand_made_results(tmp_path):
  from experiments import segmentation_study as study

  def results(dice_a, dice_c):
    entry = lambda d: {"metrics": {"dice": d, "iou": d / (2 - d), "dice_global": d,
                                   "iou_global": None}}
    return {"test_sets": {"in_distribution": entry(dice_a), "site_C": entry(dice_c)},
            "num_train_masks": 10, "best": {"step": 4, "value": 0.9}, "steps": 4,
            "wall_time_s": 1.0}

  rows = []
  for init, seed, dice_a, dice_c in (("scratch", 0, 0.80, 0.50), ("scratch", 1, 0.90, 0.60),
                                     ("gmml", 0, 0.95, 0.70)):
    rows += study.rows_from_results(results(dice_a, dice_c), run=f"{init}/{seed}", init=init,
                                    fraction=0.05, seed=seed, run_dir="")
  table = study.write_outputs(rows, str(tmp_path), {"model": "ViT-tiny/4", "steps": 4,
                                                    "seeds": [0, 1], "notes": ["note"]})
  # scratch: mean 0.85, std (ddof=1) of (0.8, 0.9) = 0.0707, 95% t-interval 0.85 +- 12.706 *
  # 0.05 (two seeds: wide); gmml has one seed, so no interval; drift (0.55 - 0.85) = -0.300.
  assert "| scratch | 0.850 +- 0.071 [0.215, 1.485] (2) |" in table
  assert "| gmml | 0.950 +- 0.000 (1) |" in table
  assert "| scratch | 5% | 0.850 +- 0.071 | 0.550 (-0.300) |" in table
  assert "| gmml | 5% | 0.950 +- 0.000 | 0.700 (-0.250) |" in table
  # Paired by seed (the same masks): gmml seed 0 minus scratch seed 0; scratch's seed 1 unpaired.
  assert "Paired difference vs `scratch`" in table
  with open(tmp_path / study.JSON_FILE) as f:
    paired = {p["test_set"]: p for p in json.load(f)["paired"]}
  assert paired["in_distribution"]["differences"] == pytest.approx([0.15])
  assert paired["site_C"]["differences"] == pytest.approx([0.20])
  assert paired["in_distribution"]["unpaired_seeds"] == [1]
  with open(tmp_path / study.CSV_FILE, encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert lines[0].split(",") == list(study.COLUMNS) and len(lines) == 1 + 6
  assert (tmp_path / study.PLOT_FILE).is_file() and (tmp_path / study.JSON_FILE).is_file()
  assert not study.gmml_available(str(tmp_path)) and not study.gmml_available("")


def test_folder_source_with_mask_column_trains_and_evaluates(tmp_path):
  """Masks from a CSV's mask-path column (the `folder` variant) go through the whole trainer."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = []
  for i in range(24):
    image = rng.integers(0, 60, (32, 32), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    top, left = rng.integers(2, 14, size=2)
    mask[top:top + 14, left:left + 12] = 255
    image[mask > 0] += 120  # the "lung" is brighter than the background
    Image.fromarray(image).save(tmp_path / f"img{i}.png")
    Image.fromarray(mask).save(tmp_path / f"mask{i}.png")
    split = "train" if i < 16 else ("val" if i < 20 else "test")
    rows.append(f"img{i}.png,mask{i}.png,{split}")
  (tmp_path / "manifest.csv").write_text("path,mask,split\n" + "\n".join(rows) + "\n")

  config = segment_config.get_config("folder")
  smoke = segment_config.get_config("smoke")
  config.data.root = str(tmp_path)
  config.data.manifest = "manifest.csv"
  config.data.image_size = 32
  config.data.train_ops = "resize(32)"
  config.data.eval_ops = "resize(32)"
  config.test_sets = ("test",)
  config.model.dtype = "float32"
  # The folder variant's 16 Grain worker processes (PAPER_SCALE_WORKERS) would spend ~10 s of
  # CPU starting up; one still decodes the masks in a worker process (several workers' order
  # and state: tests/test_pipeline.py and tests/test_data_topology.py).
  config.data.worker_count = 1
  config.mesh.devices = 1
  for key in ("name", "decoder"):
    config.model[key] = smoke.model[key]
  for key in ("batch_size", "eval_batch_size", "total_steps", "eval_every_steps",
              "log_every_steps", "checkpoint_every_steps", "async_checkpointing",
              "num_figure_examples"):
    config[key] = smoke[key]
  config.optimizer.warmup_steps = 1
  workdir = str(tmp_path / "run")
  results = train_segment.train_and_evaluate(config, workdir)
  assert results["num_train_masks"] == 16
  metrics = results["test_sets"]["test"]["metrics"]
  assert metrics["num_examples"] == 4 and 0.0 <= metrics["dice"] <= 1.0
  assert os.path.isfile(os.path.join(workdir, "predictions", "test.png"))


def test_study_stops_at_a_preempted_run(tmp_path, monkeypatch, capsys):
  from experiments import segmentation_study as study  # pylint: disable=g-import-not-at-top
  calls = []

  def preempted(config, workdir):  # what train_segment returns when SIGTERM stopped the loop
    calls.append(workdir)
    return {"finished": False, "steps": 3, "total_steps": 8, "preempted": True}

  monkeypatch.setattr(train_segment, "train_and_evaluate", preempted)
  result = study.run_study(str(tmp_path), gmml_init="", fractions=(0.05, 1.0), seeds=(0,),
                           steps=8)
  assert result["preempted"] and len(calls) == 1 and not result["rows"] and not result["failed"]
  assert "preempted at step 3 and saved; rerun the study to resume" in capsys.readouterr().out
