"""Grain input pipelines, one entry point per use; each returns this process's batches.

- `make_pretrain_dataset`: SimCLR pretraining, `num_views` augmented views per record.
  Batches: `views` uint8 (B, V, H, W, C), `label`, `site`, `skipped_records`.
- `make_multicrop_dataset`: multi-crop pretraining (SwAV; Ghesu et al. 2022), `num_global`
  large and `num_local` small views per record, plus which records count as labeled.
  Batches: `global_views` uint8 (B, G_n, G, G, C), `local_views` uint8 (B, L_n, L, L, C),
  `label`, `labeled`, `site`, `skipped_records`.
- `make_gmml_dataset`: GMML pretraining, a clean view and the same view corrupted by group
  masking. Batches: `clean`, `corrupted` uint8 (B, H, W, C), `mask` uint8 (B, H/p, W/p),
  `fill`, `label`, `site`, `skipped_records`.
- `make_train_dataset`: supervised fine-tuning, one augmented view.
  Batches: `image` uint8 (B, H, W, C), `label`, `site`, `skipped_records` (+ `lung_mask`).
- `make_eval_dataset`: one deterministic pass, the last batch padded, with a `valid` mask.
  Batches: `image`, `label`, `site`, `id`, `valid` (+ `lung_mask`).

The training pipelines are one stream in three parts, each in its own module:
data_pipelines/stream.py (the global-batch stream: the same batches on any topology, exact
resume; `StreamOptions`, built once from `config.data` by `StreamOptions.from_config`),
data_pipelines/bad_records.py (skipping and counting unreadable records, bounded by a share)
and data_pipelines/transforms.py (the per-record transform of each objective).

Evaluation (`make_eval_dataset`) keeps a per-process split: process p reads records
p, p + P, p + 2P, ..., padded to the same number of batches on every process; every record is
evaluated exactly once across processes.
"""
from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import grain
import numpy as np

from data_pipelines import bad_records
from data_pipelines import ops as ops_lib
from data_pipelines import ops_masking
from data_pipelines import stream
from data_pipelines import transforms


def make_pretrain_dataset(source: Any, *, batch_size: int, ops: Sequence[ops_lib.Op] | str,
                          options: stream.StreamOptions,
                          num_views: int = 2) -> grain.IterDataset:
  """The contrastive pretraining pipeline: `num_views` augmented views of every record.

  Args:
    source: random-access source (`__len__`, `__getitem__` -> record dict, see
      data_pipelines/sources/base.py); must be picklable when options.worker_count > 0.
    batch_size: records per batch on this process, b = the global batch / shard_count.
    ops: op list (objects from `presets.get_preset`, or a spec `ops.parse_ops` accepts); must
      end at a fixed size.
    options: seed, epochs, shards, channels, bad-record policy, workers (stream.StreamOptions;
      `StreamOptions.from_config(config)` in a trainer).
    num_views: augmented views per record (SimCLR: 2).

  Returns:
    A Grain IterDataset; `iter()` gives a checkpointable iterator of dicts with `views` uint8
    (B, num_views, H, W, C), `label` (B,) int32 or (B, K) float32, `site` (B,) int32 and
    `skipped_records` (int).

  Raises:
    ValueError: bad sizes or shards, no whole global batch in a finite run, or ops that do
      not fix the output size.
  """
  if num_views < 1:
    raise ValueError(f"num_views must be >= 1; got {num_views}")
  ops = transforms.check_ops(ops, "make_pretrain_dataset")
  return stream.make_stream(source, transforms.AugmentViews(ops, num_views, options.num_channels),
                            batch_size=batch_size, options=options)


def make_multicrop_dataset(source: Any, *, batch_size: int,
                           global_ops: Sequence[ops_lib.Op] | str,
                           local_ops: Sequence[ops_lib.Op] | str | None,
                           options: stream.StreamOptions, num_global: int = 2,
                           num_local: int = 4,
                           labeled_indices: np.ndarray | None = None) -> grain.IterDataset:
  """The multi-crop pretraining pipeline (SwAV; Ghesu et al. 2022): global + local views.

  Same global stream, process slices, per-record seeding, bad-record counting and
  checkpointable iterator as `make_pretrain_dataset`; each record gives `num_global` views
  from `global_ops` and then `num_local` views from `local_ops` (e.g.
  `presets.get_multicrop_ops`), all from the record's own generator, so a resumed run sees the
  same crops.

  `labeled` marks the labeled part of a batch for the hybrid (contrastive + supervised) loss:
  with `labeled_indices`, 1.0 exactly for records whose SOURCE index is in it (the label
  fraction, e.g. `data_pipelines.subset.subset_indices(source, fraction, seed)`); without
  it, 1.0 for records whose label is not the unlabeled marker (label >= 0; all entries >= 0
  for multi-label). `label` is passed through as the source gives it either way: the loss must
  mask it with `labeled`.

  Args:
    source: random-access source (see `make_pretrain_dataset`).
    batch_size: records per batch on this process.
    global_ops: op list of the global views; must end at a fixed size G.
    local_ops: op list of the local views; must end at a fixed size L. May be None when
      num_local is 0.
    options: as in `make_pretrain_dataset`.
    num_global: global views per record (>= 1; swapped prediction and NT-Xent need 2).
    num_local: local views per record (>= 0). With 0 the batches have NO `local_views` key
      (no empty (B, 0, ...) array): the loss then runs on global views only.
    labeled_indices: 1-D integer array of source indices that count as labeled, or None.

  Returns:
    A Grain IterDataset; `iter()` gives a checkpointable iterator of dicts with
    `global_views` uint8 (B, num_global, G, G, C), `local_views` uint8 (B, num_local, L, L, C)
    (only when num_local > 0), `label` (B,) int32 or (B, K) float32, `labeled` (B,) float32
    in {0, 1}, `site` (B,) int32 and `skipped_records` (int).

  Raises:
    ValueError: bad view counts, sizes, shards or labeled_indices, or ops that do not fix the
      output size.
  """
  if num_global < 1:
    raise ValueError(f"num_global must be >= 1; got {num_global}")
  if num_local < 0:
    raise ValueError(f"num_local must be >= 0; got {num_local}")
  global_ops = transforms.check_ops(global_ops, "make_multicrop_dataset (global_ops)")
  if num_local > 0:
    if local_ops is None:
      raise ValueError(f"make_multicrop_dataset: num_local={num_local} needs local_ops "
                       "(e.g. from presets.get_multicrop_ops); got None")
    local_ops = transforms.check_ops(local_ops, "make_multicrop_dataset (local_ops)")
  else:
    local_ops = []
  if labeled_indices is not None:
    labeled_indices = transforms.check_labeled_indices(labeled_indices, len(source))
  transform = transforms.AugmentMultiCrop(global_ops, local_ops, num_global, num_local,
                                          options.num_channels, labeled_indices)
  return stream.make_stream(source, transform, batch_size=batch_size, options=options,
                            reader_type=bad_records.IndexedRecordReader)


def make_train_dataset(source: Any, *, batch_size: int, ops: Sequence[ops_lib.Op] | str,
                       options: stream.StreamOptions) -> grain.IterDataset:
  """The supervised fine-tuning pipeline: one augmented view per record.

  Args: as `make_pretrain_dataset`, without num_views.

  Returns:
    A Grain IterDataset of dicts with `image` uint8 (B, H, W, C), `label`, `site`,
    `skipped_records` (int), and `lung_mask` uint8 (B, H, W) when the source has masks.

  Raises:
    ValueError: bad sizes, shards, or ops that do not fix the output size.
  """
  ops = transforms.check_ops(ops, "make_train_dataset")
  return stream.make_stream(source, transforms.AugmentOne(ops, options.num_channels),
                            batch_size=batch_size, options=options)


def num_eval_batches(num_records: int, batch_size: int, shard_count: int) -> int:
  """Batches every process runs in an eval pass: ceil(ceil(N / shard_count) / batch_size)."""
  return math.ceil(math.ceil(num_records / shard_count) / batch_size)


def make_eval_dataset(source: Any, *, batch_size: int, ops: Sequence[ops_lib.Op] | str,
                      shard_index: int | None = None, shard_count: int | None = None,
                      num_channels: int = 3, read_threads: int = 2) -> grain.IterDataset:
  """One deterministic pass over this process's shard, padded so all processes step together.

  Every process yields `num_eval_batches(len(source), batch_size, shard_count)` full batches;
  padding elements repeat the shard's first record with `valid` False. Concatenating the valid
  rows of all shards gives every record exactly once.

  Args:
    source: random-access source.
    batch_size: records per batch on this process.
    ops: eval op list (e.g. `presets.get_preset(name, "eval", size)`); must fix the size.
    shard_index: this process's shard (default jax.process_index()): records shard_index,
      shard_index + shard_count, ... (`shard_indices`).
    shard_count: number of shards (default jax.process_count()).
    num_channels: 3 (grey repeated to RGB) or 1.
    read_threads: threads reading and transforming records.

  Returns:
    A Grain IterDataset of dicts with `image` uint8 (B, H, W, C), `label`, `site` (B,) int32,
    `id` (B,) str, `valid` (B,) bool, and `lung_mask` when the source has masks.

  Raises:
    ValueError: bad sizes or shards, or ops that do not fix the output size. Bad records are
      never skipped in evaluation: their BadRecordError propagates.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size (per process) must be positive; got {batch_size}")
  ops = transforms.check_ops(ops, "make_eval_dataset")
  stream.check_not_empty(source)
  shard_index, shard_count = stream.resolve_shard(shard_index, shard_count)
  indices = stream.shard_indices(len(source), shard_index, shard_count)
  padded_length = num_eval_batches(len(source), batch_size, shard_count) * batch_size
  padded = np.concatenate([indices, np.full(padded_length - len(indices), indices[0])])
  reader = bad_records.RecordReader(source, padded, skip_bad_records=False)
  dataset = (grain.MapDataset.source(reader)
             .map_with_index(transforms.EvalTransform(ops, num_channels, num_real=len(indices)))
             .batch(batch_size))
  return dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                   prefetch_buffer_size=2 * batch_size))


def make_gmml_dataset(source: Any, *, batch_size: int, clean_ops: Sequence[ops_lib.Op] | str,
                      corrupt_ops: Sequence[ops_lib.Op] | str, patch_size: int,
                      options: stream.StreamOptions,
                      coverage: tuple[float, float] = (0.5, 0.75),
                      max_group_share: float = 0.3,
                      fill_shares: tuple[float, float, float] = (1.0, 0.0, 0.0),
                      noise: str = "uniform") -> grain.IterDataset:
  """The GMML pretraining pipeline: a clean view, and the same view corrupted by group masking.

  Per record: `clean_ops` (geometry + light intensity changes) give the clean view, the
  reconstruction target; `corrupt_ops` (intensity only: the geometry must stay the clean view's,
  otherwise the pixel target is undefined) then `ops_masking.GroupMask` give the corrupted
  view, the model's input. "other_image" fills are done per batch on the host after batching:
  the masked patches take the clean pixels of another record of the same PROCESS batch
  (`ops_masking.fill_from_other_images`), in the Grain workers when worker_count > 0. Host
  rather than device: it is one numpy select on data already in host memory (measured on this
  2-core CPU: 19 ms per 64-image 224 px batch with a third of the images filled from others,
  54 ms when all are, i.e. 0.3-0.8 ms per image against ~5 ms per image for the 224 px
  augmentations themselves), the jitted step stays a pure function of its input, a
  device-side donor from another shard of a sharded batch would need a collective permute
  of whole images, and the logged image grid shows exactly what the model saw.

  Same global stream, process slices, per-record seeding, bad-record counting and
  checkpointable iterator as `make_pretrain_dataset` (exact resume: a record's views, mask and
  donor offset come from its own generator; the donor is chosen from the batch position, which
  a resumed iterator reproduces). The one part that depends on the topology: an other-image
  fill's donor is a record of this process's batch, so with other processes (or another
  per-process batch size) an "other_image" row gets another donor; clean views, masks, fill
  kinds and noise or zero fills are the same on every topology.

  Args:
    source: random-access source (see `make_pretrain_dataset`).
    batch_size: records per batch on this process.
    clean_ops: op list of the clean view; must end at a fixed size divisible by patch_size.
    corrupt_ops: intensity-only op list applied to the clean view before masking (may be "").
    patch_size: the ViT patch size p; groups are made of whole p x p patches.
    options: as in `make_pretrain_dataset` (the seed also draws every record's mask).
    coverage: (low, high) range of the per-image target masked fraction (uniform).
    max_group_share: a group's side is at most this share of the patch grid's side.
    fill_shares: relative shares of (noise, zeros, other_image) fills, one kind per image.
    noise: "uniform" or "gaussian" (see ops_masking).

  Returns:
    A Grain IterDataset; `iter()` gives a checkpointable iterator of dicts with `clean` uint8
    (B, H, W, C), `corrupted` uint8 (B, H, W, C), `mask` uint8 (B, H/p, W/p) (1 = masked
    patch), `fill` int8 (B,) (ops_masking.FILL_*), `label`, `site` (B,) int32 and
    `skipped_records` (int).

  Raises:
    ValueError: bad sizes, shards or mask settings, clean ops that do not fix the size, or
      corrupt ops that change the geometry.
  """
  clean_ops = transforms.check_ops(clean_ops, "make_gmml_dataset (clean_ops)")
  corrupt_ops = transforms.check_intensity_only(corrupt_ops, "make_gmml_dataset (corrupt_ops)")
  mask_op = ops_masking.GroupMask(patch_size=patch_size, coverage=tuple(coverage),
                                  max_group_share=max_group_share,
                                  fill_shares=tuple(fill_shares), noise=noise)
  return stream.make_stream(
      source, transforms.AugmentGMML(clean_ops, corrupt_ops, mask_op, options.num_channels),
      batch_size=batch_size, options=options,
      batch_transform=transforms.FillFromOtherImages(patch_size))
