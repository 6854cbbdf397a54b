"""Images in a folder, listed by a CSV manifest (PNG 8/16-bit, JPEG, DICOM, ...).

The manifest has one row per image: a path column (relative to `root`, or absolute) and
label column(s):

* multi-class: one column of integer class ids 0..K-1 (written as "2" or "2.0", as pandas
  writes integer-valued floats), or of class names when `classes` (`data.classes`) declares
  the names in index order (the column may then also hold the ids). Without declared classes
  the classes are class_0..class_max, max taken over ALL rows of the manifest (before the split
  filter), so train and test agree. Anything else -- a name, "N/A", "yes", a negative or
  fractional number -- is a bad row (error naming the file, the row and the value): labels are
  never renumbered silently. A column with no integer id at all and no declared classes is a
  configuration error (the message lists its values and suggests `data.classes`).
* multi-label: several 0/1 columns (the column names are the class names). An empty cell or -1
  (e.g. CheXpert "uncertain") is -1: unknown.
* no label columns: an unlabeled folder for pretraining (label -1).

An empty label cell is an unlabeled row (-1). Optional columns: `patient_column` (keeps a
patient's images together in `split_by_patient`), `split_column` (rows whose value equals the
split), `site_column` (int, or names mapped to their sorted index), `mask_column` (a mask image;
nonzero = lung).

An image path listed in several rows (a duplicate: the same file after joining `root`) is kept,
but counted in a warning with a few examples (and the paths whose rows name different splits or
patients); `split_by_patient` puts every row of one file in one split, so a duplicate cannot
put an image into both training and test.

Checked at construction (fail fast, naming the row): missing columns, a manifest (or split)
without rows, labels that are not class ids or declared classes, non-0/1 multi-label values.
With `skip_bad_records=True` bad rows are dropped, logged and listed in `source.skipped` as
(record, reason). Checked when a record is read (`BadRecordError`, for the pipeline to fail or
skip+count): a missing, empty, corrupt, truncated, zero-size or undecodable image file, a mask
whose size differs from the image.
File existence is not checked at construction: on a network file system a stat per image of a
million-image corpus costs minutes.

Large images can be decoded at reduced size (`decode_size`, see `data_pipelines.decode`).
"""
from __future__ import annotations

import codecs
import csv
import io
import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from data_pipelines import decode
from data_pipelines.errors import BadRecordError
from data_pipelines import storage
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
  """"3", "3.0", "3e0" -> 3; anything else (names, "1.5", "nan", "inf") -> None."""
  try:
    value = float(text)
  except ValueError:
    return None
  if not math.isfinite(value) or value != int(value):
    return None
  return int(value)


def _class_id(text: str) -> int | None:
  """A multi-class label cell -> its class id (a non-negative integer), or None."""
  value = _as_int(text)
  return value if value is not None and value >= 0 else None


def _classes_hint(values: Sequence[str]) -> str:
  """'data.classes="a,b,c"' from a column's distinct values (sorted, at most 20)."""
  distinct = sorted(set(values))
  return 'data.classes="' + ",".join(distinct[:20]) + (",..." if len(distinct) > 20 else "") + '"'


class FolderSource(Source):
  """Image files listed in a CSV manifest."""

  def __init__(self, root: str, manifest: str, split: str | None = None,
               image_column: str = "path", label_columns: str | Sequence[str] | None = "label",
               classes: str | Sequence[str] | None = None, patient_column: str | None = None,
               split_column: str | None = None, mask_column: str | None = None,
               site_column: str | None = None, num_channels: int = 1,
               keep_bit_depth: bool = False, skip_bad_records: bool = False,
               name: str | None = None, decode_size: int = 0, labels_optional: bool = False,
               manifest_encoding: str = "utf-8"):
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
      decode_size: > 0: decode large images at reduced size, the shorter side >= decode_size
        (JPEG by DCT scaling, others by a box filter after decoding; see data_pipelines.decode;
        masks are reduced to the image's size by a majority vote); 0: full resolution.
      labels_optional: a label column missing from the manifest is not an error: the images
        are read unlabeled (pretraining needs only images), with one log line.
      manifest_encoding: the manifest's text encoding (a Python codec name, e.g. "cp1252" for a
        CSV saved by Excel on Windows); with "utf-8" a leading byte-order mark is skipped.

    Raises:
      FileNotFoundError: missing manifest.
      ValueError: a byte the encoding cannot decode (naming the line and the fix), an unknown
        encoding, an empty manifest, a declared column is missing, a split has no rows (or
        only bad ones), a multi-class column of names without `classes`, or a bad label row
        (without skip_bad_records; a BadRecordError naming the row).
    """
    if num_channels not in (1, 3):
      raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
    self.root = str(root or "")
    manifest = str(manifest or "")
    if not manifest:
      raise ValueError("the folder source needs a manifest CSV (data.manifest)")
    if (not storage.is_url(manifest) and not os.path.isabs(manifest)
        and not os.path.exists(manifest) and self.root):
      manifest = storage.join(self.root, manifest)
    if not storage.isfile(manifest):
      raise FileNotFoundError(f"manifest {manifest} does not exist (data.manifest)")
    self.manifest = manifest
    manifest_name = storage.basename(manifest)
    self.split = split
    self.name = name or (f"{os.path.splitext(manifest_name)[0]}/{split}" if split
                         else os.path.splitext(manifest_name)[0])
    self.num_channels = int(num_channels)
    self.keep_bit_depth = bool(keep_bit_depth)
    self.decode_size = max(0, int(decode_size or 0))
    label_columns = parse_columns(label_columns)

    text = decode_manifest(storage.read_bytes(manifest), manifest, manifest_encoding)
    with io.StringIO(text, newline="") as f:
      reader = csv.DictReader(f)
      header = [c.strip() for c in (reader.fieldnames or [])]
      rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if not header:
      raise ValueError(f"manifest {manifest} is empty: expected a header row naming the columns "
                       f"(e.g. {image_column},{','.join(label_columns) or 'label'}) and one row "
                       "per image (data.manifest)")
    if not rows:
      raise ValueError(f"manifest {manifest} has a header but no rows: list one image per row "
                       "(data.manifest)")
    missing_labels = [c for c in label_columns if c not in header]
    if labels_optional and missing_labels:
      logging.info("%s has no label column %s (data.label_columns): reading its images without "
                   "labels, which is all pretraining needs.", manifest_name,
                   ", ".join(repr(c) for c in missing_labels))
      label_columns = []
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
    _warn_duplicate_paths(manifest_name, rows, self.root, image_column,
                          patient_column=patient_column, split_column=split_column)

    # Classes come from the whole manifest so that every split agrees.
    self.multi_label = len(label_columns) > 1
    if self.multi_label:
      self.class_names = list(label_columns)
    elif label_columns:
      values = [r[label_columns[0]] for r in rows if r[label_columns[0]] != ""]
      ids = [i for i in map(_class_id, values) if i is not None]
      if classes:
        self.class_names = parse_columns(classes)
      elif values and not ids:
        # Not a few bad rows: the column holds names, and the classes must be declared.
        distinct = sorted(set(values))
        shown = ", ".join(repr(v) for v in distinct[:8]) + (", ..." if len(distinct) > 8 else "")
        raise ValueError(
            f"{manifest}: the label column '{label_columns[0]}' (data.label_columns) holds "
            f"{len(distinct)} distinct values ({shown}) and not one integer class id. A "
            "multi-class label column holds class ids 0, 1, 2, ... unless data.classes declares "
            f"the class names in index order, e.g. {_classes_hint(values)}")
      else:
        self.class_names = [f"class_{i}" for i in range(max(ids, default=-1) + 1)]
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
    self._files = []  # Each record's image file, root joined and normalised.
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
        label, problem = self._parse_label(row, label_columns, bool(classes))
      if problem:
        self.skipped.append((record, problem))
        continue
      image_id = path if path not in ids_seen else f"{path}#row{number}"
      ids_seen.add(image_id)
      self._ids.append(image_id)
      self._paths.append(path)
      self._files.append(_file_key(self.root, path))
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
    if not self._paths:  # Every row was bad and skipped: nothing to read.
      record, why = self.skipped[0]
      raise ValueError(f"manifest {manifest}: all {len(self.skipped)} rows"
                       f"{f' of split {split!r}' if split_column and split is not None else ''} "
                       f"are bad, so the source is empty; first: {record}: {why}")
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
    if declared and text in self.class_names:
      return self.class_names.index(text), None
    value = _class_id(text)
    if value is not None and value < self.num_classes:
      return value, None
    if declared:
      return None, (f"label {text!r} outside the declared classes "
                    f"[{', '.join(self.class_names)}] (or indices 0..{self.num_classes - 1})")
    if _as_int(text) is not None:  # A negative number.
      return None, (f"label {text!r} is not a class id (0, 1, 2, ...); leave the cell empty "
                    "for an image without a label")
    return None, (f"label {text!r} is not an integer class id (0, 1, 2, ...); a column of "
                  "class names needs data.classes declaring them in index order (an empty "
                  "cell marks an image without a label)")

  @property
  def labels(self) -> np.ndarray:
    return self._label_array

  @property
  def ids(self) -> list[str]:
    return list(self._ids)

  @property
  def files(self) -> list[str]:
    """Each record's image file (root joined, normalised): equal for duplicate rows."""
    return list(self._files)

  def __len__(self) -> int:
    return len(self._paths)

  def image_path(self, index: int) -> str:
    return storage.join(self.root, self._paths[index])

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = check_index(index, len(self._paths), self.name)
    path = self.image_path(index)
    image, full_hw = decode.read_image_and_size(path, record=path,
                                                keep_bit_depth=self.keep_bit_depth,
                                                min_size=self.decode_size)
    image = to_channels(as_hwc(image, path), self.num_channels)
    label = self._label_array[index]
    example = {"image": image, "label": np.copy(label)[()], "id": self._ids[index],
               "site": np.int32(self._sites[index])}
    if self.has_masks:
      mask_path = storage.join(self.root, self._masks[index])
      if not self._masks[index]:
        raise BadRecordError(path, "mask_column is set but this row has no mask path")
      mask = decode.read_image(mask_path, record=mask_path)
      if mask.shape[:2] != tuple(full_hw):
        raise BadRecordError(mask_path, f"mask size {mask.shape[:2]} differs from image size "
                             f"{tuple(full_hw)} of {path}")
      mask = (mask.max(axis=-1) > 0).astype(np.uint8)
      if mask.shape != image.shape[:2]:  # The image was decoded at reduced size.
        mask = _reduce_mask(mask, image.shape[:2])
      example["lung_mask"] = mask
    return example


def decode_manifest(data: bytes, manifest: str, encoding: str = "utf-8") -> str:
  """A manifest's bytes as text; an undecodable byte is an error naming the file and line.

  Raises:
    ValueError: an unknown encoding, or bytes that are not valid in it (the message names the
      line, the byte and both fixes: re-save as UTF-8 or set data.manifest_encoding).
  """
  try:
    codec = codecs.lookup(encoding).name
  except LookupError:
    raise ValueError(f"data.manifest_encoding={encoding!r} is not a known text encoding; use a "
                     "Python codec name such as 'utf-8', 'cp1252' or 'latin-1'") from None
  try:
    # A BOM (Excel's "CSV UTF-8") would otherwise become part of the first column's name.
    return data.decode("utf-8-sig" if codec == "utf-8" else codec)
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    byte = data[e.start:e.start + 1].hex()
    raise ValueError(
        f"manifest {manifest} line {line}: byte 0x{byte} is not valid {encoding} ({e.reason}). "
        "Re-save the file as UTF-8 (e.g. 'CSV UTF-8' in Excel, or `iconv -f cp1252 -t utf-8`), "
        "or name its encoding with --config.data.manifest_encoding=... (e.g. cp1252 or "
        "latin-1)") from None


def _file_key(root: str, path: str) -> str:
  """The file a manifest path names: joined to `root` and normalised ("a/./b.png" = "a/b.png")."""
  path = storage.join(root, path) if root else path
  return path if storage.is_url(path) else os.path.normpath(path)


def _warn_duplicate_paths(manifest_name: str, rows: Sequence[Mapping[str, str]], root: str,
                          image_column: str, *, patient_column: str | None,
                          split_column: str | None) -> None:
  """One warning counting the image files listed in more than one row, with examples."""
  rows_of: dict[str, list[Mapping[str, str]]] = {}
  for row in rows:
    if row.get(image_column):
      rows_of.setdefault(_file_key(root, row[image_column]), []).append(row)
  duplicates = {path: rows for path, rows in rows_of.items() if len(rows) > 1}
  if not duplicates:
    return
  def examples(paths):
    return ", ".join(paths[:5]) + (", ..." if len(paths) > 5 else "")
  extra_rows = sum(len(rows) - 1 for rows in duplicates.values())
  notes = []
  for column, what in ((split_column, "splits"), (patient_column, "patients")):
    if column:
      mixed = [path for path, rows in duplicates.items() if len({r[column] for r in rows}) > 1]
      if mixed:
        notes.append(f"; {len(mixed)} of them under different {what} ({column}): "
                     f"{examples(mixed)}")
  logging.warning(
      "%s lists %d image files more than once (%d extra rows), e.g. %s%s. Each duplicate row "
      "is read as a record of its own; split_by_patient (data.split_fractions) keeps all rows of "
      "a file (and of their patients) in one split. Deduplicate the manifest unless repeating "
      "an image is intended.", manifest_name, len(duplicates), extra_rows,
      examples(list(duplicates)), "".join(notes))


def _reduce_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """A binary (H, W) mask reduced to `size_hw` by a majority vote (box mean >= 1/2)."""
  box = Image.fromarray(mask * np.uint8(255), "L").resize((size_hw[1], size_hw[0]),
                                                            Image.Resampling.BOX)
  return (np.asarray(box) >= 128).astype(np.uint8)


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


def _record_groups(patients: Sequence[str],
                   files: Sequence[str] | None) -> dict[str, list[int]]:
  """{group key: record indices (ascending)}: records linked by a shared patient or file.

  Connected components (union-find): a file listed under two patients joins both patients'
  records. The key is the group's smallest patient id, so without duplicate files the groups
  and their keys are exactly the patients.
  """
  parent = list(range(len(patients)))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  first_of: dict[tuple[str, str], int] = {}
  for i, patient in enumerate(patients):
    links = [("patient", patient)] + ([("file", files[i])] if files is not None else [])
    for link in links:
      j = first_of.setdefault(link, i)
      parent[find(i)] = find(j)
  members: dict[int, list[int]] = {}
  for i in range(len(patients)):
    members.setdefault(find(i), []).append(i)
  return {min(patients[i] for i in group): group for group in members.values()}


def split_by_patient(source: Source, fractions: str | Mapping[str, float],
                     seed: int = 0) -> dict[str, IndexView]:
  """Splits a source so that all images of a patient, and all rows of an image, share a split.

  Records are grouped: the records of one patient (from `source.patients`; every record is its
  own patient when there is none), joined with every record of the same image file (from
  `source.files`, when present: a manifest may list a file twice, even under two patients).
  Groups are shuffled with `seed` and dealt out in that order: a group goes to the first split
  whose share of images is not yet filled. Split sizes therefore match the fractions up to one
  group's images. Deterministic for a given manifest and seed; without duplicate files the
  groups are the patients, as before files were considered.

  Args:
    source: any source; `patients` and `files` (lists, one entry per record) are used when
      present.
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
  groups = _record_groups(patients, getattr(source, "files", None))
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
