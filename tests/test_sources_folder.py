"""Folder + CSV manifest source and the decoders: PNG 8/16-bit, JPEG, modes, real DICOMs
(compared with an independent NumPy windowing), masks, patient splits and every bad input."""
import csv
import os
import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from data_pipelines import decode
from data_pipelines.errors import BadRecordError
from data_pipelines.sources import build_source, default_data_config, split_by_patient
from data_pipelines.sources.folder import FolderSource


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _png(path, array, mode=None):
  image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
  image.save(path)
  return array


# ---- decoding ----

def test_png_modes(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (10, 7), dtype=np.uint8)
  rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
  _png(tmp_path / "l.png", gray)
  Image.fromarray(np.dstack([gray, np.full_like(gray, 9)]), "LA").save(tmp_path / "la.png")
  _png(tmp_path / "rgb.png", rgb)
  Image.fromarray(np.dstack([rgb, np.zeros_like(rgb[..., :1])])).save(tmp_path / "rgba.png")
  Image.fromarray(rgb).quantize(8).save(tmp_path / "p.png")
  np.testing.assert_array_equal(decode.read_image(str(tmp_path / "l.png"))[:, :, 0], gray)
  np.testing.assert_array_equal(decode.read_image(str(tmp_path / "la.png"))[:, :, 0], gray)
  np.testing.assert_array_equal(decode.read_image(str(tmp_path / "rgb.png")), rgb)
  np.testing.assert_array_equal(decode.read_image(str(tmp_path / "rgba.png")), rgb)
  palette = decode.read_image(str(tmp_path / "p.png"))
  expected = np.array(Image.open(tmp_path / "p.png").convert("RGB"))
  np.testing.assert_array_equal(palette, expected)


def test_png_16bit(tmp_path):
  values = np.array([[100, 4095], [2000, 100]], np.uint16)  # 12-bit data in a 16-bit PNG.
  Image.fromarray(values).save(tmp_path / "x16.png")
  assert Image.open(tmp_path / "x16.png").mode in ("I;16", "I")
  kept = decode.read_image(str(tmp_path / "x16.png"), keep_bit_depth=True)
  assert kept.dtype == np.uint16
  np.testing.assert_array_equal(kept[:, :, 0], values)
  display = decode.read_image(str(tmp_path / "x16.png"))
  expected = np.rint((values - 100.0) / (4095 - 100) * 255).astype(np.uint8)
  assert display.dtype == np.uint8
  np.testing.assert_array_equal(display[:, :, 0], expected)


def test_jpeg(tmp_path):
  gray = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))
  Image.fromarray(gray).save(tmp_path / "x.jpg", quality=95)
  decoded = decode.read_image(str(tmp_path / "x.jpg"))
  assert decoded.shape == (16, 32, 1) and np.abs(decoded[:, :, 0].astype(int) - gray).max() < 8


def _numpy_window(ds, out_max=255):
  """Independent implementation of PS3.3 C.11.2.1.2.1 LINEAR (written from the standard)."""
  x = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
      ds.get("RescaleIntercept", 0))
  center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
  if center is None:
    y = (x - x.min()) / (x.max() - x.min()) * out_max
  else:
    c = float(center[0]) if isinstance(center, pydicom.multival.MultiValue) else float(center)
    w = float(width[0]) if isinstance(width, pydicom.multival.MultiValue) else float(width)
    y = np.empty_like(x)
    low, high = x <= c - 0.5 - (w - 1) / 2, x > c - 0.5 + (w - 1) / 2
    mid = ~(low | high)
    y[low], y[high] = 0, out_max
    y[mid] = ((x[mid] - (c - 0.5)) / (w - 1) + 0.5) * out_max
  if ds.PhotometricInterpretation == "MONOCHROME1":
    y = out_max - y
  return np.rint(y).astype(np.uint8 if out_max == 255 else np.uint16)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_matches_numpy_window(name):
  path = get_testdata_file(name)
  ds = pydicom.dcmread(path)
  decoded = decode.read_image(path)
  assert decoded.shape == ds.pixel_array.shape + (1,) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded[:, :, 0], _numpy_window(ds))
  kept = decode.read_image(path, keep_bit_depth=True)
  assert kept.dtype == np.uint16
  np.testing.assert_array_equal(kept[:, :, 0], _numpy_window(ds, 65535))


def test_dicom_monochrome1_with_slope_and_window():
  # A real CR with MONOCHROME1, RescaleSlope 0.684, intercept 200, window 1600/2800.
  base = os.path.dirname(get_testdata_file("CT_small.dcm"))
  path = os.path.join(base, "dicomdirtests", "77654033", "CR1", "6154")
  ds = pydicom.dcmread(path)
  assert ds.PhotometricInterpretation == "MONOCHROME1" and float(ds.RescaleSlope) != 1
  decoded = decode.read_image(path, record="cr")
  np.testing.assert_array_equal(decoded[:, :, 0], _numpy_window(ds))
  # Also agrees with pydicom's own VOI implementation, which outputs the range of the modality
  # LUT (intercept .. intercept + slope * (2**BitsStored - 1)) and leaves the MONOCHROME1
  # inversion to the viewer.
  from pydicom.pixels import apply_modality_lut, apply_voi_lut
  voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, prefer_lut=False)
  low = float(ds.RescaleIntercept)
  high = low + float(ds.RescaleSlope) * (2 ** int(ds.BitsStored) - 1)
  voi = (voi - low) / (high - low) * 255
  assert np.abs(decoded[:, :, 0].astype(float) - (255 - voi)).max() <= 1
  assert decoded.std() > 5  # Not a saturated window.


def test_dicom_rgb():
  path = get_testdata_file("SC_rgb_rle.dcm")
  decoded = decode.read_image(path)
  np.testing.assert_array_equal(decoded, pydicom.dcmread(path).pixel_array)
  assert decoded.shape == (100, 100, 3)


# ---- the folder source ----

def _folder(tmp_path):
  rng = np.random.default_rng(1)
  (tmp_path / "img").mkdir()
  images = {}
  for i in range(6):
    array = rng.integers(0, 256, (20 + i, 16), dtype=np.uint8)
    _png(tmp_path / "img" / f"{i}.png", array)
    images[f"img/{i}.png"] = array
  rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
  _png(tmp_path / "img" / "rgb.png", rgb)
  images["img/rgb.png"] = rgb
  rows = [[f"img/{i}.png", ["normal", "pneumonia"][i % 2], f"p{i // 2}", "ABC"[i % 3]]
          for i in range(6)] + [["img/rgb.png", "", "p9", "A"]]
  manifest = _write_csv(tmp_path / "manifest.csv", ["path", "finding", "patient", "site"], rows)
  return manifest, images


def test_folder_multiclass(tmp_path):
  manifest, images = _folder(tmp_path)
  source = FolderSource(str(tmp_path), "manifest.csv", label_columns="finding",
                        classes="normal,pneumonia", patient_column="patient", site_column="site")
  assert len(source) == 7 and source.class_names == ["normal", "pneumonia"]
  np.testing.assert_array_equal(source.labels, [0, 1, 0, 1, 0, 1, -1])
  example = source[3]
  np.testing.assert_array_equal(example["image"][:, :, 0], images["img/3.png"])
  assert example["id"] == "img/3.png" and example["site"] == 0 and example["label"] == 1
  rgb = source[6]["image"]  # Converted to the source's single channel with luma weights.
  expected = np.rint(images["img/rgb.png"].astype(float) @ [0.299, 0.587, 0.114])
  np.testing.assert_array_equal(rgb[:, :, 0], expected.astype(np.uint8))
  assert source[1]["site"] == 1  # "B" is the second sorted site name.


def test_folder_multilabel_and_unlabeled(tmp_path):
  manifest, _ = _folder(tmp_path)
  _write_csv(tmp_path / "ml.csv", ["path", "nodule", "effusion"],
             [["img/0.png", 1, 0], ["img/1.png", 0, ""], ["img/2.png", "1.0", "1"]])
  source = FolderSource(str(tmp_path), "ml.csv", label_columns=["nodule", "effusion"],
                        num_channels=3)
  assert source.multi_label and source.class_names == ["nodule", "effusion"]
  np.testing.assert_array_equal(source.labels, [[1, 0], [0, -1], [1, 1]])
  assert source[0]["image"].shape == (20, 16, 3) and source[0]["label"].dtype == np.float32
  unlabeled = FolderSource(str(tmp_path), "ml.csv", label_columns="")
  assert unlabeled.num_classes == 0 and unlabeled[2]["label"] == -1


def test_folder_split_column_and_mask(tmp_path):
  (tmp_path / "a.png").write_bytes(b"")
  _png(tmp_path / "x.png", np.full((8, 8), 50, np.uint8))
  mask = np.zeros((8, 8), np.uint8)
  mask[2:5, 1:7] = 255
  _png(tmp_path / "m.png", mask)
  _write_csv(tmp_path / "s.csv", ["path", "label", "split", "mask"],
             [["x.png", 1, "train", "m.png"], ["x.png", 0, "test", "m.png"]])
  config = default_data_config()
  config.update(dict(source="folder", root=str(tmp_path), manifest="s.csv",
                     split_column="split", mask_column="mask"))
  test = build_source(config, "test")
  assert len(test) == 1 and test.labels.tolist() == [0] and test.num_classes == 2
  np.testing.assert_array_equal(test[0]["lung_mask"], (mask > 0).astype(np.uint8))
  with pytest.raises(ValueError, match="no rows with split == 'val'; values present: test, train"):
    build_source(config, "val")


def test_split_by_patient_keeps_patients_together(tmp_path):
  rows = [[f"{i}.png", i % 2, f"p{i // 3}"] for i in range(90)]  # 30 patients x 3 images.
  _write_csv(tmp_path / "m.csv", ["path", "label", "patient"], rows)
  source = FolderSource(str(tmp_path), "m.csv", patient_column="patient")
  splits = split_by_patient(source, "train=0.6,val=0.2,test=0.2", seed=0)
  patients = {k: {source.patients[i] for i in v.indices} for k, v in splits.items()}
  assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
  assert not (patients["val"] & patients["test"])
  assert [len(splits[k]) for k in ("train", "val", "test")] == [54, 18, 18]
  again = split_by_patient(source, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
  assert again["val"].ids == splits["val"].ids
  config = default_data_config()
  config.update(dict(source="folder", root=str(tmp_path), manifest="m.csv",
                     patient_column="patient", split_fractions="train=0.6,val=0.2,test=0.2"))
  assert build_source(config, "val").ids == splits["val"].ids
  config.split_fractions = ""
  with pytest.raises(ValueError, match="set data.split_column"):
    build_source(config, "test")


# ---- bad input ----

def _zero_width_png():
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 4, 8, 0, 0, 0, 0)) +
          chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_bad_files_raise_bad_record_error(tmp_path):
  good = np.full((16, 16), 77, np.uint8)
  _png(tmp_path / "good.png", good)
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "garbage.png").write_bytes(b"this is not an image at all" * 10)
  data = (tmp_path / "good.png").read_bytes()
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(buffer, "PNG")
  (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
  (tmp_path / "zero.png").write_bytes(_zero_width_png())
  dicom = open(get_testdata_file("MR_truncated.dcm"), "rb").read()
  (tmp_path / "truncated.dcm").write_bytes(dicom)
  names = ["good.png", "missing.png", "empty.png", "garbage.png", "truncated.png", "zero.png",
           "truncated.dcm"]
  _write_csv(tmp_path / "m.csv", ["path", "label"], [[n, 0] for n in names])
  source = FolderSource(str(tmp_path), "m.csv")
  np.testing.assert_array_equal(source[0]["image"][:, :, 0], good)
  reasons = {}
  for i, name in enumerate(names[1:], start=1):
    with pytest.raises(BadRecordError) as info:
      source[i]
    assert info.value.record == str(tmp_path / name)
    reasons[name] = info.value.reason
  assert reasons["missing.png"] == "file does not exist"
  assert reasons["empty.png"] == "empty file (0 bytes)"
  assert "corrupt" in reasons["garbage.png"] and "corrupt" in reasons["truncated.png"]
  assert "corrupt" in reasons["zero.png"] or "zero-size" in reasons["zero.png"]
  assert "pixel data" in reasons["truncated.dcm"]
  assert len(data) > 0


def test_zero_size_array_is_bad():
  from data_pipelines.sources.base import as_hwc
  with pytest.raises(BadRecordError, match="zero-size image"):
    as_hwc(np.zeros((0, 5), np.uint8), "x")


def test_missing_column_names_column_and_columns(tmp_path):
  _write_csv(tmp_path / "manifest.csv", ["path", "finding", "site"], [["a.png", "x", "A"]])
  with pytest.raises(ValueError, match=r"manifest.csv has no column 'label' \(data.label_columns\);"
                     r" columns are: path, finding, site"):
    FolderSource(str(tmp_path), "manifest.csv", label_columns="label")


def test_label_outside_declared_classes(tmp_path):
  _write_csv(tmp_path / "m.csv", ["path", "label"],
             [["a.png", "normal"], ["b.png", "pneumothorax"], ["c.png", "7"], ["d.png", "1"]])
  with pytest.raises(BadRecordError, match=r"m.csv row 3 \(b.png\).*label 'pneumothorax' outside "
                     r"the declared classes \[normal, pneumonia\].*2 bad rows"):
    FolderSource(str(tmp_path), "m.csv", classes=["normal", "pneumonia"])
  source = FolderSource(str(tmp_path), "m.csv", classes=["normal", "pneumonia"],
                        skip_bad_records=True)
  assert source.ids == ["a.png", "d.png"] and source.labels.tolist() == [0, 1]
  assert [r for r, _ in source.skipped] == ["m.csv row 3 (b.png)", "m.csv row 4 (c.png)"]
  _write_csv(tmp_path / "ml.csv", ["path", "a", "b"], [["a.png", 1, 2]])
  with pytest.raises(BadRecordError, match=r"label b='2' is not 0, 1 or empty"):
    FolderSource(str(tmp_path), "ml.csv", label_columns="a,b")


def test_multiclass_labels_are_class_ids_unless_classes_are_declared(tmp_path):
  # Once `0,1,1.0,abc,yes` silently became a 5-class task (sorted names) and `0,1,N/A` a
  # 3-class one. Now only integer ids (1.0 is 1) are labels; anything else names row and value.
  _write_csv(tmp_path / "m.csv", ["path", "label"],
             [["a.png", "0"], ["b.png", "1"], ["c.png", "1.0"], ["d.png", "abc"], ["e.png", "yes"],
              ["f.png", ""]])
  with pytest.raises(BadRecordError, match=r"m.csv row 5 \(d.png\): label 'abc' is not an integer "
                     r"class id .*data.classes.*2 bad rows in all"):
    FolderSource(str(tmp_path), "m.csv")
  source = FolderSource(str(tmp_path), "m.csv", skip_bad_records=True)
  assert source.num_classes == 2 and source.class_names == ["class_0", "class_1"]
  assert source.ids == ["a.png", "b.png", "c.png", "f.png"]
  assert source.labels.tolist() == [0, 1, 1, -1]  # The empty cell is an unlabeled image.
  assert [r for r, _ in source.skipped] == ["m.csv row 5 (d.png)", "m.csv row 6 (e.png)"]

  _write_csv(tmp_path / "na.csv", ["path", "label"],
             [["a.png", 0], ["b.png", 1], ["c.png", "N/A"], ["d.png", "nan"], ["e.png", "-1"],
              ["g.png", "2.5"]])
  with pytest.raises(BadRecordError, match=r"na.csv row 4 \(c.png\): label 'N/A' is not an "
                     r"integer class id.*4 bad rows"):
    FolderSource(str(tmp_path), "na.csv")
  source = FolderSource(str(tmp_path), "na.csv", skip_bad_records=True)
  assert source.num_classes == 2 and source.labels.tolist() == [0, 1]
  reasons = dict(source.skipped)
  assert "leave the cell empty" in reasons["na.csv row 6 (e.png)"]
  assert "'2.5' is not an integer class id" in reasons["na.csv row 7 (g.png)"]
  # Via the config, the way a run builds it.
  config = default_data_config()
  config.update(dict(source="folder", root=str(tmp_path), manifest="na.csv"))
  with pytest.raises(BadRecordError, match="'N/A'"):
    build_source(config, "train")


def test_column_of_names_without_declared_classes_is_a_config_error(tmp_path):
  _write_csv(tmp_path / "m.csv", ["path", "finding"],
             [["a.png", "pneumonia"], ["b.png", "normal"], ["c.png", ""], ["d.png", "normal"]])
  for skip in (False, True):  # Not bad rows to skip: the classes must be declared.
    with pytest.raises(ValueError, match=r"m.csv: the label column 'finding' \(data.label_columns\)"
                       r" holds 2 distinct values \('normal', 'pneumonia'\) and not one integer "
                       r"class id.*e.g. data.classes=\"normal,pneumonia\""):
      FolderSource(str(tmp_path), "m.csv", label_columns="finding", skip_bad_records=skip)
  source = FolderSource(str(tmp_path), "m.csv", label_columns="finding",
                        classes="normal,pneumonia")
  assert source.labels.tolist() == [1, 0, -1, 0]
  # A column with only empty cells is an unlabeled folder, not an error.
  _write_csv(tmp_path / "u.csv", ["path", "label"], [["a.png", ""], ["b.png", ""]])
  unlabeled = FolderSource(str(tmp_path), "u.csv")
  assert unlabeled.num_classes == 0 and unlabeled.labels.tolist() == [-1, -1]


def test_empty_manifest_names_the_file(tmp_path):
  (tmp_path / "header_only.csv").write_text("path,label\n")
  (tmp_path / "blank.csv").write_text("")
  config = default_data_config()
  config.update(dict(source="folder", root=str(tmp_path)))
  for name, what in (("header_only.csv", "has a header but no rows"), ("blank.csv", "is empty")):
    config.manifest = name
    with pytest.raises(ValueError, match=f"manifest {tmp_path / name} {what}"):
      build_source(config, "train")
  _write_csv(tmp_path / "bad.csv", ["path", "label", "split"],
             [["a.png", "x", "train"], ["b.png", "-3", "train"], ["c.png", "1", "test"]])
  with pytest.raises(ValueError, match=r"bad.csv: all 2 rows of split 'train' are bad, so the "
                     r"source is empty; first: bad.csv row 2 \(a.png\): label 'x'"):
    FolderSource(str(tmp_path), "bad.csv", split="train", split_column="split",
                 skip_bad_records=True)


# ---- reduced-size decoding of large images (data.decode_size) ----

def _smooth(height, width, channels=None, seed=0, dtype=np.uint8, top=255):
  """A smooth random image (low-frequency content, like a radiograph), written-test sized."""
  rng = np.random.default_rng(seed)
  shape = (8, 8) if channels is None else (8, 8, channels)
  small = rng.uniform(0, 1, shape).astype(np.float32)
  planes = [small] if channels is None else [small[..., c] for c in range(channels)]
  big = [np.asarray(Image.fromarray(p, "F").resize((width, height), Image.Resampling.BICUBIC))
         for p in planes]
  big = np.clip(np.stack(big, -1) if channels else big[0], 0, 1)
  return np.rint(big * top).astype(dtype)


def _block_mean(array, factor):
  """Independent box reduction: mean of factor x factor blocks (sizes divisible by factor)."""
  array = np.asarray(array, np.float64)
  h, w = array.shape[:2]
  return array.reshape(h // factor, factor, w // factor, factor, *array.shape[2:]).mean((1, 3))


def test_reduced_png_is_a_box_mean_of_the_full_image(tmp_path):
  gray, rgb = _smooth(1024, 768, seed=1), _smooth(768, 1024, channels=3, seed=2)
  Image.fromarray(gray).save(tmp_path / "gray.png")
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  for name, array in (("gray.png", gray), ("rgb.png", rgb)):
    full = decode.read_image(str(tmp_path / name))
    np.testing.assert_array_equal(full[..., 0] if array.ndim == 2 else full, array)
    reduced, full_hw = decode.read_image_and_size(str(tmp_path / name), min_size=190)
    assert full_hw == array.shape[:2] and reduced.dtype == np.uint8
    assert reduced.shape[:2] == (array.shape[0] // 4, array.shape[1] // 4)  # 768 // 190 = 4.
    assert min(reduced.shape[:2]) >= 190
    expected = _block_mean(full.astype(float), 4)
    assert np.abs(reduced.astype(float) - expected).max() <= 0.5 + 1e-9  # Rounding only.
  # Sizes that do not divide: the shorter side is still >= the request, aspect kept.
  Image.fromarray(_smooth(1001, 701, seed=3)).save(tmp_path / "odd.png")
  odd = decode.read_image(str(tmp_path / "odd.png"), min_size=300)
  assert odd.shape == (501, 351, 1)  # Factor 701 // 300 = 2, partial edge blocks.
  # Never upscaled, and only reduced when at least halved: 599 < 2 x 300.
  Image.fromarray(_smooth(599, 800, seed=4)).save(tmp_path / "small.png")
  np.testing.assert_array_equal(decode.read_image(str(tmp_path / "small.png"), min_size=300),
                                decode.read_image(str(tmp_path / "small.png")))
  assert decode.read_image(str(tmp_path / "small.png"), min_size=5000).shape == (599, 800, 1)


def test_reduced_jpeg_uses_dct_scaling_close_to_a_box_mean(tmp_path):
  gray, rgb = _smooth(1024, 768, seed=5), _smooth(1024, 1024, channels=3, seed=6)
  Image.fromarray(gray).save(tmp_path / "gray.jpg", quality=95)
  Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
  for name, size, scale in (("gray.jpg", 190, 4), ("rgb.jpg", 300, 2), ("rgb.jpg", 100, 8)):
    full = decode.read_image(str(tmp_path / name))
    reduced = decode.read_image(str(tmp_path / name), min_size=size)
    assert reduced.shape == (full.shape[0] // scale, full.shape[1] // scale, full.shape[2])
    assert min(reduced.shape[:2]) >= size
    difference = np.abs(reduced.astype(float) - _block_mean(full, scale))
    assert difference.mean() < 0.75 and difference.max() <= 4, (name, size, difference.max())


def test_reduced_16bit_png_and_dicom(tmp_path):
  values = _smooth(1024, 1024, seed=7, dtype=np.uint16, top=4095)
  values[0, 0], values[-1, -1] = 0, 4095  # The stretch must use the full image's range.
  Image.fromarray(values).save(tmp_path / "x16.png")
  kept = decode.read_image(str(tmp_path / "x16.png"), keep_bit_depth=True, min_size=256)
  assert kept.dtype == np.uint16 and kept.shape == (256, 256, 1)
  assert np.abs(kept[..., 0] - _block_mean(values, 4)).max() <= 0.5 + 1e-6
  display = decode.read_image(str(tmp_path / "x16.png"), min_size=256)
  stretched = decode.read_image(str(tmp_path / "x16.png")).astype(float)[..., 0]
  assert display.dtype == np.uint8
  assert np.abs(display[..., 0] - _block_mean(values / 4095 * 255, 4)).max() <= 0.5 + 1e-6
  assert np.abs(display[..., 0] - _block_mean(stretched, 4)).max() <= 1
  # DICOM: windowed in full, then box-reduced (the window is not linear).
  path = get_testdata_file("CT_small.dcm")
  full = decode.read_image(path, keep_bit_depth=True)
  reduced = decode.read_image(path, keep_bit_depth=True, min_size=32)
  assert reduced.dtype == np.uint16 and reduced.shape == (32, 32, 1)
  assert np.abs(reduced[..., 0] - _block_mean(full[..., 0], 4)).max() <= 0.5 + 1e-6
  reduced8 = decode.read_image(path, min_size=40)
  assert reduced8.shape == (43, 43, 1)  # Factor 128 // 40 = 3, partial last block.


def test_decode_size_config_and_masks(tmp_path):
  image = _smooth(1024, 1024, seed=8)
  Image.fromarray(image).save(tmp_path / "big.png")
  mask = np.zeros((1024, 1024), np.uint8)
  mask[100:610, 301:702] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  Image.fromarray(mask[:512]).save(tmp_path / "wrong.png")
  _write_csv(tmp_path / "m.csv", ["path", "mask"],
             [["big.png", "mask.png"], ["big.png", "wrong.png"]])
  config = default_data_config()
  config.update(dict(source="folder", root=str(tmp_path), manifest="m.csv", label_columns="",
                     mask_column="mask", image_size=128))
  assert config.decode_size == -1  # Auto: 2 x image_size.
  auto = build_source(config, "train")
  example = auto[0]
  assert example["image"].shape == (256, 256, 1) and example["lung_mask"].shape == (256, 256)
  expected_mask = (_block_mean(mask > 0, 4) >= 0.5).astype(np.uint8)
  np.testing.assert_array_equal(example["lung_mask"], expected_mask)
  with pytest.raises(BadRecordError, match=r"mask size \(512, 1024\) differs from image size "
                     r"\(1024, 1024\)"):
    auto[1]
  config.decode_size = 0  # Full resolution: today's pixels.
  full = build_source(config, "train")[0]
  np.testing.assert_array_equal(full["image"][..., 0], image)
  np.testing.assert_array_equal(full["lung_mask"], (mask > 0).astype(np.uint8))
  direct = FolderSource(str(tmp_path), "m.csv", label_columns="", mask_column="mask")[0]
  np.testing.assert_array_equal(direct["image"], full["image"])  # The class defaults to 0.
  config.decode_size = 300
  assert build_source(config, "train")[0]["image"].shape == (342, 342, 1)  # Factor 3, partial edge.
  config.decode_size = -2
  with pytest.raises(ValueError, match="data.decode_size=-2"):
    build_source(config, "train")
