"""Images in a folder, listed by a CSV manifest (PNG 8/16-bit, JPEG, DICOM, ...).

The manifest has one row per image: a path column (relative to `root`, or absolute) and
label column(s):

* multi-class: one column holding class names or integer indices; `classes` declares the
  classes and their order (recommended: then every split agrees). Without it, integer labels
  give classes 0..max and names give the sorted names, both taken over ALL rows of the manifest
  (before the split filter), so train and test still agree.
* multi-label: several 0/1 columns (the column names are the class names). An empty cell or -1
  (e.g. CheXpert "uncertain") is -1: unknown.
* no label columns: an unlabeled folder for pretraining (label -1).

An empty label cell is an unlabeled row (-1). Optional columns: `patient_column` (keeps a
patient's images together in `split_by_patient`), `split_column` (rows whose value equals the
split), `site_column` (int, or names mapped to their sorted index), `mask_column` (a mask image;
nonzero = lung).

Checked at construction (fail fast, naming the row): missing columns, labels outside the
declared classes, non-0/1 multi-label values. With `skip_bad_records=True` such rows are dropped,
logged and listed in `source.skipped` as (record, reason). Checked when a record is read
(`BadRecordError`, for the pipeline to fail or skip+count): a missing, empty, corrupt,
truncated, zero-size or undecodable image file, a mask whose size differs from the image.
File existence is not checked at construction: on a network file system a stat per image of a
million-image corpus costs minutes.
"""
from __future__ import annotations

import csv
import os
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipelines import decode
from data_pipelines.errors import BadRecordError
from data_pipelines.sources.base import (IndexView, Source, as_hwc, check_index, log_skipped,
                                         to_channels)


def parse_columns(columns: str | Sequence[str] | None) -> list[str]:
  """"a, b" / ["a", "b"] / None -> ["a", "b"] / []."""
  if columns is None:
    return []
  if isinstance(columns, str):
    return [c.strip() for c in columns.split(",") if c.strip()]
  return [str(c).strip() for c in columns if str(c).strip()]


def _as_int(text: str) -> int | None:
  try:
    value = float(text)
  except ValueError:
    return None
  return int(value) if value == int(value) else None


class FolderSource(Source):
  """Image files listed in a CSV manifest."""

  def __init__(self, root: str, manifest: str, split: str | None = None,
               image_column: str = "path", label_columns: str | Sequence[str] | None = "label",
               classes: str | Sequence[str] | None = None, patient_column: str | None = None,
               split_column: str | None = None, mask_column: str | None = None,
               site_column: str | None = None, num_channels: int = 1,
               keep_bit_depth: bool = False, skip_bad_records: bool = False,
               name: str | None = None):
    """Reads and validates the manifest (no image is opened).

    Args:
      root: folder the image paths are relative to.
      manifest: the CSV file; a relative path that does not exist is looked up under `root`.
      split: with `split_column`, keep the rows whose split value equals it.
      image_column: column holding image paths.
      label_columns: one column (multi-class), several (multi-label, 0/1), or none
        (unlabeled); a list or a comma-separated string.
      classes: declared class names for a multi-class column, in index order.
      patient_column: patient identifier column (for `split_by_patient`).
      split_column: split name column ("train", "val", "test", ...).
      mask_column: column with mask image paths (nonzero = inside the lungs).
      site_column: site / hospital column.
      num_channels: 1 or 3; every image is converted to it (RGB -> gray uses luma weights).
      keep_bit_depth: keep 16-bit PNG / DICOM as uint16 (see data_pipelines.decode).
      skip_bad_records: drop rows with bad labels (listed in `skipped`) instead of raising.
      name: source name; default "<manifest file name>/<split>".

    Raises:
      FileNotFoundError: missing manifest.
      ValueError: a declared column is missing, a split has no rows, or a bad label row
        (without skip_bad_records; a BadRecordError naming the row).
    """
    if num_channels not in (1, 3):
      raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
    self.root = str(root or "")
    manifest = str(manifest or "")
    if not manifest:
      raise ValueError("the folder source needs a manifest CSV (data.manifest)")
    if not os.path.isabs(manifest) and not os.path.exists(manifest) and self.root:
      manifest = os.path.join(self.root, manifest)
    if not os.path.isfile(manifest):
      raise FileNotFoundError(f"manifest {manifest} does not exist (data.manifest)")
    self.manifest = manifest
    manifest_name = os.path.basename(manifest)
    self.split = split
    self.name = name or (f"{os.path.splitext(manifest_name)[0]}/{split}" if split
                         else os.path.splitext(manifest_name)[0])
    self.num_channels = int(num_channels)
    self.keep_bit_depth = bool(keep_bit_depth)
    label_columns = parse_columns(label_columns)

    with open(manifest, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      header = [c.strip() for c in (reader.fieldnames or [])]
      rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    declared = {"data.image_column": [image_column], "data.label_columns": label_columns,
                "data.patient_column": [patient_column], "data.split_column": [split_column],
                "data.mask_column": [mask_column], "data.site_column": [site_column]}
    for key, columns in declared.items():
      for column in columns:
        if column and column not in header:
          raise ValueError(f"{manifest_name} has no column '{column}' ({key}); columns are: "
                           f"{', '.join(header)}")
    # Row numbers as a spreadsheet shows them: the header is row 1.
    numbered = list(enumerate(rows, start=2))

    # Classes come from the whole manifest so that every split agrees.
    self.multi_label = len(label_columns) > 1
    if self.multi_label:
      self.class_names = list(label_columns)
    elif label_columns:
      values = [r[label_columns[0]] for r in rows if r[label_columns[0]] != ""]
      if classes:
        self.class_names = parse_columns(classes)
      elif values and all(_as_int(v) is not None for v in values):
        self.class_names = [f"class_{i}" for i in range(max(_as_int(v) for v in values) + 1)]
      else:
        self.class_names = sorted(set(values))
    else:
      self.class_names = []
    self.num_classes = len(self.class_names)

    if split_column and split is not None:
      present = sorted({r[split_column] for r in rows})
      numbered = [(n, r) for n, r in numbered if r[split_column] == split]
      if not numbered:
        raise ValueError(f"{manifest_name}: no rows with {split_column} == {split!r}; values "
                         f"present: {', '.join(present)}")

    self.skipped = []
    self._paths, self._labels, self._patients, self._sites, self._masks, self._ids = \
        [], [], [], [], [], []
    site_values = sorted({r[site_column] for r in rows}) if site_column else []
    self.site_names = site_values
    ids_seen = set()
    for number, row in numbered:
      record = f"{manifest_name} row {number} ({row.get(image_column, '')})"
      path = row[image_column]
      if not path:
        problem = f"empty {image_column!r} cell"
        label = None
      else:
        label, problem = self._parse_label(row, label_columns, classes is not None)
      if problem:
        self.skipped.append((record, problem))
        continue
      image_id = path if path not in ids_seen else f"{path}#row{number}"
      ids_seen.add(image_id)
      self._ids.append(image_id)
      self._paths.append(path)
      self._labels.append(label)
      self._patients.append(row[patient_column] if patient_column else "")
      self._masks.append(row[mask_column] if mask_column else "")
      site = row[site_column] if site_column else ""
      self._sites.append(0 if site == "" else (_as_int(site) if _as_int(site) is not None
                                               else site_values.index(site)))
    if self.skipped and not skip_bad_records:
      record, why = self.skipped[0]
      raise BadRecordError(record, f"{why}; {len(self.skipped)} bad rows in all (fix the "
                           "manifest, or set skip_bad_records=True to drop and count them)")
    log_skipped(self.name, self.skipped)
    if self.multi_label:
      self._label_array = (np.array(self._labels, np.float32).reshape(-1, self.num_classes))
    else:
      self._label_array = np.array(self._labels, np.int32).reshape(-1)
    self.patients = self._patients if patient_column else None
    self.has_masks = bool(mask_column)

  def _parse_label(self, row: Mapping[str, str], label_columns: list[str],
                   declared: bool) -> tuple[Any, str | None]:
    """-> (label, None) or (None, reason)."""
    if not label_columns:
      return -1, None
    if self.multi_label:
      label = []
      for column in label_columns:
        text = row[column]
        value = -1 if text == "" else _as_int(text)
        if value not in (0, 1, -1):
          return None, f"label {column}={text!r} is not 0, 1 or empty"
        label.append(value)
      return label, None
    text = row[label_columns[0]]
    if text == "":
      return -1, None
    if text in self.class_names:
      return self.class_names.index(text), None
    value = _as_int(text)
    if value is not None and 0 <= value < self.num_classes:
      return value, None
    what = "declared classes" if declared else "classes"
    return None, (f"label {text!r} outside the {what} "
                  f"[{', '.join(self.class_names)}] (or indices 0..{self.num_classes - 1})")

  @property
  def labels(self) -> np.ndarray:
    return self._label_array

  @property
  def ids(self) -> list[str]:
    return list(self._ids)

  def __len__(self) -> int:
    return len(self._paths)

  def image_path(self, index: int) -> str:
    return os.path.join(self.root, self._paths[index])

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = check_index(index, len(self._paths), self.name)
    path = self.image_path(index)
    image = decode.read_image(path, record=path, keep_bit_depth=self.keep_bit_depth)
    image = to_channels(as_hwc(image, path), self.num_channels)
    label = self._label_array[index]
    example = {"image": image, "label": np.copy(label)[()], "id": self._ids[index],
               "site": np.int32(self._sites[index])}
    if self.has_masks:
      mask_path = os.path.join(self.root, self._masks[index])
      if not self._masks[index]:
        raise BadRecordError(path, "mask_column is set but this row has no mask path")
      mask = decode.read_image(mask_path, record=mask_path)
      if mask.shape[:2] != image.shape[:2]:
        raise BadRecordError(mask_path, f"mask size {mask.shape[:2]} differs from image size "
                             f"{image.shape[:2]} of {path}")
      example["lung_mask"] = (mask.max(axis=-1) > 0).astype(np.uint8)
    return example


def parse_fractions(fractions: str | Mapping[str, float]) -> dict[str, float]:
  """"train=0.8,val=0.1,test=0.1" or a dict -> {"train": 0.8, ...}; validated."""
  if isinstance(fractions, str):
    parsed = {}
    for part in fractions.split(","):
      if not part.strip():
        continue
      if "=" not in part:
        raise ValueError(f"split_fractions entry {part!r} is not name=fraction "
                         "(e.g. 'train=0.8,val=0.1,test=0.1')")
      key, value = part.split("=", 1)
      parsed[key.strip()] = float(value)
    fractions = parsed
  fractions = {str(k): float(v) for k, v in dict(fractions).items()}
  if not fractions or any(v <= 0 for v in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
    raise ValueError(f"split fractions {fractions} must be > 0 and sum to <= 1")
  return fractions


def split_by_patient(source: Source, fractions: str | Mapping[str, float],
                     seed: int = 0) -> dict[str, IndexView]:
  """Splits a source so that all images of a patient land in the same split.

  Patients (from `source.patients`; every record is its own patient when there is none) are
  shuffled with `seed` and dealt out in that order: a patient goes to the first split whose
  share of images is not yet filled. Split sizes therefore match the fractions up to one
  patient's images. Deterministic for a given manifest and seed.

  Args:
    source: any source; `patients` (a list, one entry per record) is used when present.
    fractions: {"train": 0.8, "val": 0.1, "test": 0.1} or "train=0.8,val=0.1,test=0.1";
      must sum to <= 1 (the remainder is left out).
    seed: shuffling seed.

  Returns:
    {split name: view of the source}.

  Raises:
    ValueError: bad fractions.
  """
  fractions = parse_fractions(fractions)
  patients = getattr(source, "patients", None)
  n = len(source)
  if not patients:
    patients = [str(i) for i in range(n)]
  groups: dict[str, list[int]] = {}
  for i, p in enumerate(patients):
    groups.setdefault(p, []).append(i)
  order = sorted(groups)
  permutation = np.random.default_rng(seed).permutation(len(order))
  names = list(fractions)
  targets = np.cumsum([fractions[k] for k in names]) * n
  assigned: dict[str, list[int]] = {k: [] for k in names}
  filled = 0
  split = 0
  for g in permutation:
    while split < len(names) and filled >= targets[split] - 1e-9:
      split += 1
    if split == len(names):
      break
    members = groups[order[g]]
    assigned[names[split]].extend(members)
    filled += len(members)
  return {k: IndexView(source, np.sort(np.array(v, np.int64)), name=f"{source.name}/{k}")
          for k, v in assigned.items()}
