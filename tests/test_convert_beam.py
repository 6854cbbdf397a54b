"""The converter on Apache Beam (in-process and with worker processes) against the
single-process converter, into a gs:// bucket read back by SimCLR pretraining, and with bad
files (counted, listed, the rest converted)."""
import csv
import io
import json
import os
import socket

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("apache_beam")

from data_pipelines import convert, convert_beam, decode, storage
from data_pipelines.errors import BadRecordError
from data_pipelines.sources import array_record, build_source, default_data_config
from data_pipelines.sources.array_record import ArrayRecordSource

IN_PROCESS = "direct_running_mode=in_memory"
TWO_PROCESSES = "direct_num_workers=2,direct_running_mode=multi_processing"


def _quiet(_):
  pass


def _synthetic(count: int = 23):
  config = default_data_config()
  config.image_size = 32
  config.num_examples.val = count
  return config


def _records(folder: str, split: str) -> list[bytes]:
  import grain  # pylint: disable=g-import-not-at-top
  shards = storage.glob(storage.join(folder, f"{split}.array_record-*"))
  reader = grain.sources.ArrayRecordDataSource(shards)
  return [reader[i] for i in range(len(reader))]


def _json_without_timings(folder: str, split: str) -> dict:
  info = storage.read_json(storage.join(folder, f"{split}.json"))
  for report in info["shard_reports"]:
    del report["seconds"], report["writer"]
  return info


def _assert_same_output(reference: str, beam_out: str, split: str) -> None:
  expected = _records(reference, split)
  records = _records(beam_out, split)
  assert len(records) == len(expected)
  for i, (a, b) in enumerate(zip(expected, records)):
    assert a == b, f"record {i} differs"
  assert sorted(storage.listdir(beam_out)) == sorted(storage.listdir(reference))
  for name in storage.listdir(reference):
    if ".array_record-" in name:  # The whole files as well, not only the records.
      assert storage.read_bytes(storage.join(beam_out, name)) == storage.read_bytes(
          storage.join(reference, name)), name
  assert _json_without_timings(beam_out, split) == _json_without_timings(reference, split)
  with storage.open_npz(storage.join(reference, f"{split}.index.npz")) as a, \
       storage.open_npz(storage.join(beam_out, f"{split}.index.npz")) as b:
    assert sorted(a.files) == sorted(b.files) == ["ids", "labels", "sites"]
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key])
      assert a[key].dtype == b[key].dtype


def test_beam_output_equals_the_single_process_converter(tmp_path, capsys, monkeypatch):
  config = _synthetic()
  reference = str(tmp_path / "reference")
  convert.convert(config, "val", reference, num_shards=5, log=_quiet)
  assert storage.read_json(f"{reference}/val.json")["count"] == 23

  # In this process, with nothing reachable but this machine: Beam's DirectRunner would first
  # try Prism (a binary it downloads); the converter names the FnApiRunner itself.
  from apache_beam.runners.portability import prism_runner  # pylint: disable=g-import-not-at-top
  prism_calls = []
  monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline",
                      lambda *args, **kwargs: prism_calls.append(args))
  connect = socket.socket.connect

  def local_only(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
        "127.0.0.1", "::1", "localhost"):
      raise OSError(f"test: no network ({address})")
    return connect(sock, address)

  monkeypatch.setattr(socket.socket, "connect", local_only)
  in_process = str(tmp_path / "in_process")
  lines = []
  info = convert_beam.convert_with_beam(config, "val", in_process, num_shards=5,
                                        pipeline_options=IN_PROCESS, log=lines.append)
  assert not prism_calls
  assert "FnApiRunner" in lines[0]
  _assert_same_output(reference, in_process, "val")
  assert info["counters"] == {"records_written": 23, "records_skipped": 0, "shards_written": 5,
                              "bytes_written": sum(r["bytes"] for r in info["shard_reports"])}
  # Progress per shard: records done of the shard's total.
  printed = capsys.readouterr().out
  assert "val shard 1/5 (records 0..4): 5/5 read, 5 written, 0 skipped" in printed
  assert "val shard 5/5 (records 19..22): 4/4 read, 4 written" in printed

  # Two worker processes, each rebuilding the source; the shards are spread over both.
  monkeypatch.undo()
  two = str(tmp_path / "two_processes")
  info = convert_beam.convert_with_beam(config, "val", two, num_shards=5,
                                        pipeline_options=TWO_PROCESSES, log=_quiet)
  _assert_same_output(reference, two, "val")
  writers = {r["writer"] for r in info["shard_reports"]}
  assert len(writers) == 2 and f"{socket.gethostname()}:{os.getpid()}" not in writers, writers
  assert info["counters"]["records_written"] == 23

  # What the readers see: the source's records.
  original = build_source(config, "val")
  shards = ArrayRecordSource(two, "val")
  assert shards.ids == original.ids
  np.testing.assert_array_equal(shards[22]["image"], original[22]["image"])


def test_pipeline_options_are_checked():
  assert convert_beam.parse_pipeline_options(TWO_PROCESSES) == [
      "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
  with pytest.raises(ValueError, match="unknown Beam pipeline option.*direct_num_worker\\b"):
    convert_beam.parse_pipeline_options("direct_num_worker=2")
  with pytest.raises(ValueError, match="'multi_processing' is not key=value"):
    convert_beam.parse_pipeline_options("multi_processing")


def test_a_rerun_with_fewer_shards_leaves_no_old_shards(tmp_path):
  out = str(tmp_path / "out")
  convert_beam.convert_with_beam(_synthetic(12), "val", out, num_shards=4,
                                 pipeline_options=IN_PROCESS, log=_quiet)
  convert_beam.convert_with_beam(_synthetic(12), "val", out, num_shards=3,
                                 pipeline_options=IN_PROCESS, log=_quiet)
  assert sorted(n for n in os.listdir(out) if ".array_record-" in n) == [
      array_record.shard_name("val", k, 3) for k in range(3)]
  assert len(ArrayRecordSource(out, "val")) == 12


def _png(path, array):
  Image.fromarray(array).save(path)


def _bad_folder(root):
  """Six good images (8- and 16-bit PNG, a DICOM) and three bad files; a manifest of all."""
  from pydicom.data import get_testdata_file  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  names = []
  for i in range(5):
    dtype = np.uint16 if i % 2 else np.uint8
    _png(root / f"{i}.png", rng.integers(0, np.iinfo(dtype).max, (40, 36), dtype))
    names.append(f"{i}.png")
  dicom = open(get_testdata_file("CT_small.dcm"), "rb").read()
  (root / "ct.dcm").write_bytes(dicom)
  (root / "truncated.dcm").write_bytes(dicom[:len(dicom) // 2])
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (64, 64), np.uint8)).save(buffer, "PNG")
  (root / "corrupt.png").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  names[2:2] = ["corrupt.png", "ct.dcm"]
  names[5:5] = ["missing.png", "truncated.dcm"]
  with open(root / "m.csv", "w", newline="") as f:
    csv.writer(f).writerows([["path", "label"]] + [[n, i % 2] for i, n in enumerate(names)])
  config = default_data_config()
  config.update(dict(source="folder", root=str(root), manifest="m.csv", keep_bit_depth=True))
  return config, names


def test_bad_files_are_counted_listed_and_the_rest_converted(tmp_path):
  config, names = _bad_folder(tmp_path)
  out = str(tmp_path / "out")
  info = convert_beam.convert_with_beam(config, "train", out, num_shards=3,
                                        pipeline_options=TWO_PROCESSES, log=_quiet,
                                        max_bad_record_share=0.5)
  bad = {"corrupt.png", "missing.png", "truncated.dcm"}
  assert info["count"] == len(names) - 3 and info["num_skipped"] == 3
  assert info["counters"]["records_skipped"] == 3
  assert info["counters"]["records_written"] == len(names) - 3
  with open(os.path.join(out, "train.json")) as f:
    listed = dict(json.load(f)["skipped"])
  assert set(listed) == {str(tmp_path / n) for n in bad}
  assert listed[str(tmp_path / "missing.png")] == "file does not exist"
  assert "corrupt" in listed[str(tmp_path / "corrupt.png")]
  assert "pixel data" in listed[str(tmp_path / "truncated.dcm")]
  converted = ArrayRecordSource(out, "train", keep_bit_depth=True)
  assert converted.ids == [n for n in names if n not in bad]
  assert converted.labels.tolist() == [i % 2 for i, n in enumerate(names) if n not in bad]
  for i, name in enumerate(converted.ids):  # Lossless, 16-bit kept, DICOM through pydicom.
    expected = decode.read_image(str(tmp_path / name), keep_bit_depth=True)
    assert converted[i]["image"].dtype == expected.dtype
    np.testing.assert_array_equal(converted[i]["image"], expected)
  assert {converted[i]["image"].dtype.name for i in range(len(converted))} == {"uint8", "uint16"}

  # The same folder under the readers' default share (0.1): 3 of 9 bad stops the pipeline and
  # no JSON is written, so no reader takes the shards for the corpus.
  with pytest.raises(Exception, match=r"3 of its 9 records are bad \(33.3%\).*"
                                      r"max_bad_record_share=0.1"):
    convert_beam.convert_with_beam(config, "train", out, num_shards=3,
                                   pipeline_options=IN_PROCESS, log=_quiet)
  assert not os.path.exists(os.path.join(out, "train.json"))
  # --strict: the first bad file fails its shard, named with the shard's records.
  with pytest.raises(Exception, match=r"train shard 1/3 \(records 0\.\.2\).*"
                                      r"BadRecordError: .*corrupt.png"):
    convert_beam.convert_with_beam(config, "train", out, num_shards=3, strict=True,
                                   pipeline_options=IN_PROCESS, log=_quiet)


def test_a_shard_failing_for_another_reason_fails_the_pipeline_naming_its_records(
    tmp_path, monkeypatch):
  encode = array_record.encode_record

  def failing(example):
    if example["id"] == "val/00007":
      raise OSError("disk full")
    return encode(example)

  monkeypatch.setattr(array_record, "encode_record", failing)
  assert build_source(_synthetic(12), "val").ids[7] == "val/00007"
  with pytest.raises(Exception, match=r"val shard 2/3 \(records 4\.\.7\) for .* failed: "
                                      r"OSError: disk full"):
    convert_beam.convert_with_beam(_synthetic(12), "val", str(tmp_path / "out"), num_shards=3,
                                   pipeline_options=IN_PROCESS, log=_quiet)
  left = os.listdir(tmp_path / "out")  # Neither the shard nor its temporary file.
  assert not [n for n in left if "val.array_record-00001" in n], left


def test_resize_at_conversion_keeps_16_bit(tmp_path):
  values = np.random.default_rng(1).integers(0, 65535, (96, 80), np.uint16)
  _png(tmp_path / "big.png", values)
  with open(tmp_path / "m.csv", "w", newline="") as f:
    csv.writer(f).writerows([["path", "label"], ["big.png", 1]])
  config = default_data_config()
  config.update(dict(source="folder", root=str(tmp_path), manifest="m.csv",
                     keep_bit_depth=True, decode_size=20))
  out = str(tmp_path / "out")
  convert_beam.convert_with_beam(config, "train", out, pipeline_options=IN_PROCESS, log=_quiet)
  image = ArrayRecordSource(out, "train", keep_bit_depth=True)[0]["image"]
  # 80 // 20 = 4: 4 x 4 box means, rounded, still 16-bit.
  assert image.shape == (24, 20, 1) and image.dtype == np.uint16
  expected = values.reshape(24, 4, 20, 4).astype(np.float64).mean(axis=(1, 3))
  np.testing.assert_allclose(image[:, :, 0], expected, atol=0.51)


@pytest.mark.slow
def test_shards_in_a_bucket_feed_simclr_pretraining(gcs, tmp_path, monkeypatch):
  from configs import pretrain_simclr  # pylint: disable=g-import-not-at-top
  from remedis_jax import train_simclr, writers  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)  # A mangled URL would appear here as ./gs:/...
  bucket = gcs.bucket()
  config = pretrain_simclr.get_config("smoke")
  data = config.data.to_dict()
  out = f"{bucket}/shards"
  info = convert_beam.convert_with_beam(data, "train", out, num_shards=3,
                                        pipeline_options=IN_PROCESS, log=_quiet)
  assert info["count"] == config.data.num_examples.train
  assert sorted(storage.listdir(out)) == sorted(
      [array_record.shard_name("train", k, 3) for k in range(3)]
      + ["train.index.npz", "train.json"])  # No temporary object left behind.
  assert not os.path.exists(tmp_path / "gs:")
  config.mesh.devices = 1
  config.data.source = "array_record"
  config.data.path = out
  config.total_steps = 2
  config.knn.every_steps = 0
  config.linear_probe.enabled = False
  workdir = str(tmp_path / "run")
  summary = train_simclr.train_and_evaluate(config, workdir)
  assert summary["steps"] == 2
  losses = [r["train/loss"] for r in writers.read_metrics(workdir) if "train/loss" in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))


def test_cli_runs_the_beam_pipeline_with_beam_pipeline_options(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = tmp_path / "cli"
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.convert", "--source=synthetic", "--split=test",
       "--num_examples=12", "--image_size=32", f"--out={out}", "--num_shards=3",
       f"--beam_pipeline_options={IN_PROCESS}"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "on Beam's FnApiRunner" in result.stdout
  assert "test shard 3/3 (records 8..11): 4/4 read, 4 written" in result.stdout
  assert "12 records in 3 shards" in result.stdout and "'records_written': 12" in result.stdout
  assert len(ArrayRecordSource(str(out), "test")) == 12


def test_cli_without_apache_beam_names_the_extra(tmp_path):
  """Where the beam extra is not installed (simulated by hiding apache_beam), the Beam flag
  fails at once with the install command, and nothing is written."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = tmp_path / "no_beam"
  code = ("import runpy, sys\n"
          "sys.modules['apache_beam'] = None\n"
          "sys.argv = ['convert'] + sys.argv[1:]\n"
          "runpy.run_module('data_pipelines.convert', run_name='__main__')\n")
  result = subprocess.run(
      [sys.executable, "-c", code, "--source=synthetic", "--split=test", "--num_examples=4",
       "--image_size=32", f"--out={out}", f"--beam_pipeline_options={IN_PROCESS}"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert result.returncode != 0
  assert 'needs Apache Beam, which is not installed: pip install -e ".[beam]"' in (
      result.stdout + result.stderr)
  assert not out.exists()
