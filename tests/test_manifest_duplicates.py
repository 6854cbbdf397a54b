"""Duplicate manifest rows: counted in a warning, and never split across train/val/test.

A manifest that lists one image file twice (a merge of two exports, a re-labelled row) used to
have each row dealt to a split on its own by `data.split_fractions`, so the same image could be
trained on and tested on. No image is read here: the folder source reads only the manifest at
construction.
"""
import csv
import logging
import os

import numpy as np
import pytest

from data_pipelines.sources import build_source, default_data_config, split_by_patient
from data_pipelines.sources.folder import FolderSource, parse_fractions

FRACTIONS = "train=0.6,val=0.2,test=0.2"


def _write_manifest(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _random_manifest(tmp_path, seed: int, with_patients: bool, patients_per_file: bool):
  """A manifest of `num_rows` rows over fewer files (many duplicates); with a patient column,
  either one patient per file or (`patients_per_file=False`) a duplicate row's patient drawn
  anew, so that one file can sit under two patients."""
  rng = np.random.default_rng(seed)
  num_files = int(rng.integers(4, 30))
  num_rows = int(rng.integers(num_files, 3 * num_files + 1))
  files = [f"img/{i}.png" for i in range(num_files)]
  # Each file at least once (a split is rarely empty), then random duplicates.
  picks = list(range(num_files)) + list(rng.integers(0, num_files, num_rows - num_files))
  rng.shuffle(picks)
  num_patients = max(1, num_files // 2)
  patient_of_file = rng.integers(0, num_patients, num_files)
  rows = []
  for k in picks:
    # "./" and "a/../": the same file written differently is still the same file.
    spelled = [files[k], "./" + files[k], f"img/x/../{k}.png"][int(rng.integers(0, 3))]
    row = [spelled, int(rng.integers(0, 2))]
    if with_patients:
      patient = patient_of_file[k] if patients_per_file else rng.integers(0, num_patients)
      row.append(f"p{patient}")
    rows.append(row)
  header = ["path", "label"] + (["patient"] if with_patients else [])
  _write_manifest(tmp_path / f"m{seed}.csv", header, rows)
  return f"m{seed}.csv"


@pytest.mark.parametrize("with_patients,patients_per_file",
                         [(False, False), (True, True), (True, False)])
def test_no_file_and_no_patient_in_two_splits_of_random_manifests(tmp_path, with_patients,
                                                                   patients_per_file):
  for seed in range(8):
    manifest = _random_manifest(tmp_path, seed, with_patients, patients_per_file)
    config = default_data_config()
    config.update(dict(source="folder", root=str(tmp_path), manifest=manifest,
                       patient_column="patient" if with_patients else "",
                       split_fractions=FRACTIONS, split_seed=seed))
    whole = FolderSource(str(tmp_path), manifest,
                         patient_column="patient" if with_patients else None)
    splits = {name: build_source(config, name) for name in ("train", "val", "test")}
    # The file each row names, worked out here from its id ("path", or "path#rowN" for a
    # repeated path) rather than read from the source.
    file_of = [os.path.normpath(i.split("#row")[0]) for i in whole.ids]
    files = {name: {file_of[i] for i in split.indices} for name, split in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
      assert not files[a] & files[b], (seed, a, b, sorted(files[a] & files[b]))
      if with_patients:
        patients_a = {whole.patients[i] for i in splits[a].indices}
        patients_b = {whole.patients[i] for i in splits[b].indices}
        assert not patients_a & patients_b, (seed, a, b)
    # The fractions sum to 1: every row is in exactly one split.
    counts = np.bincount(np.concatenate([s.indices for s in splits.values()]),
                         minlength=len(whole))
    assert (counts == 1).all(), seed
    # "./img/3.png", "img/x/../3.png" and "img/3.png" are one file to the source, too.
    assert sorted(set(whole.files)) == sorted({str(tmp_path / f) for f in file_of})


def _split_before_files_were_considered(patients, fractions, seed):
  """split_by_patient as it was at 027eb5e (patients only): a manifest without duplicate files
  must keep exactly these splits, so that existing runs' splits do not move."""
  fractions = parse_fractions(fractions)
  groups = {}
  for i, p in enumerate(patients):
    groups.setdefault(p, []).append(i)
  order = sorted(groups)
  permutation = np.random.default_rng(seed).permutation(len(order))
  names = list(fractions)
  targets = np.cumsum([fractions[k] for k in names]) * len(patients)
  assigned = {k: [] for k in names}
  filled, split = 0, 0
  for g in permutation:
    while split < len(names) and filled >= targets[split] - 1e-9:
      split += 1
    if split == len(names):
      break
    assigned[names[split]].extend(groups[order[g]])
    filled += len(groups[order[g]])
  return {k: sorted(v) for k, v in assigned.items()}


@pytest.mark.parametrize("with_patients", [False, True])
def test_manifest_without_duplicates_keeps_its_earlier_split(tmp_path, with_patients):
  rng = np.random.default_rng(3)
  rows = [[f"{i}.png", i % 2] + ([f"p{rng.integers(0, 15)}"] if with_patients else [])
          for i in range(47)]
  _write_manifest(tmp_path / "m.csv", ["path", "label"] + (["patient"] if with_patients else []),
                  rows)
  source = FolderSource(str(tmp_path), "m.csv",
                        patient_column="patient" if with_patients else None)
  patients = source.patients or [str(i) for i in range(len(source))]
  for seed in range(4):
    splits = split_by_patient(source, "train=0.5,val=0.2,test=0.2", seed=seed)
    expected = _split_before_files_were_considered(patients, "train=0.5,val=0.2,test=0.2", seed)
    assert {k: v.indices.tolist() for k, v in splits.items()} == expected


def test_duplicate_paths_are_counted_in_a_warning(tmp_path, caplog):
  rows = [["a.png", 0, "p1", "train"], ["b.png", 1, "p2", "train"], ["a.png", 1, "p3", "test"],
          ["./a.png", 0, "p1", "train"], ["c.png", 0, "p4", "val"], ["c.png", 0, "p4", "val"]]
  _write_manifest(tmp_path / "dup.csv", ["path", "label", "patient", "split"], rows)
  with caplog.at_level(logging.WARNING):
    source = FolderSource(str(tmp_path), "dup.csv", patient_column="patient")
  assert len(source) == 6  # Kept: a repeated image may be intended.
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings
  message = warnings[0]
  assert "dup.csv lists 2 image files more than once (3 extra rows)" in message
  assert "a.png" in message and "c.png" in message
  assert "1 of them under different patients (patient)" in message

  caplog.clear()
  with caplog.at_level(logging.WARNING):
    FolderSource(str(tmp_path), "dup.csv", split_column="split", split="train")
  message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert "1 of them under different splits (split)" in message

  caplog.clear()
  _write_manifest(tmp_path / "unique.csv", ["path", "label"], [["a.png", 0], ["b.png", 1]])
  with caplog.at_level(logging.WARNING):
    FolderSource(str(tmp_path), "unique.csv")
  assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_file_under_two_patients_joins_both_patients(tmp_path):
  # p1 and p2 share x.png: all of p1's and p2's images go to one split.
  rows = ([["x.png", 0, "p1"], ["x.png", 0, "p2"], ["y.png", 0, "p1"], ["z.png", 0, "p2"]]
          + [[f"{i}.png", 0, f"q{i}"] for i in range(12)])
  _write_manifest(tmp_path / "m.csv", ["path", "label", "patient"], rows)
  source = FolderSource(str(tmp_path), "m.csv", patient_column="patient")
  for seed in range(10):
    splits = split_by_patient(source, "train=0.5,val=0.25,test=0.25", seed=seed)
    holding = [k for k, v in splits.items() if set(v.indices.tolist()) & {0, 1, 2, 3}]
    assert len(holding) == 1 and {0, 1, 2, 3} <= set(splits[holding[0]].indices.tolist())
