"""data_pipelines/download.py and the quickstart's choice of data, against a local HTTP server.

The server (http.server on 127.0.0.1, port 0, in a thread) serves a small generated MedMNIST
.npz: whole, cut short, or not at all; a closed port stands for no network. The real
PneumoniaMNIST copy in ../shared/data plays a file the user placed in the folder.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import socket
import threading

import numpy as np
import pytest

from data_pipelines import download
from experiments import label_fraction_sweep, quickstart
from experiments import sweep_plan
from remedis_jax import export, train_simclr


def _medmnist_bytes() -> bytes:
  """A MedMNIST-layout .npz: 28 px uint8 images, (N, 1) labels, both classes in every split."""
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 40), ("val", 10), ("test", 10)):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
  payload = b""

  def do_GET(self):  # pylint: disable=invalid-name
    if self.path not in ("/good.npz", "/truncated.npz"):
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Length", str(len(self.payload)))
    self.end_headers()
    # The truncated file announces its full length and stops halfway (a dropped connection).
    end = len(self.payload) if self.path == "/good.npz" else len(self.payload) // 2
    self.wfile.write(self.payload[:end])

  def log_message(self, *args):  # keep the test output quiet
    pass


@pytest.fixture(scope="module")
def server():
  """(base URL, served bytes, their md5); stopped after the module's tests."""
  payload = _medmnist_bytes()
  handler = type("Handler", (_Handler,), {"payload": payload})
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", payload, hashlib.md5(payload).hexdigest()
  httpd.shutdown()
  httpd.server_close()
  thread.join()


@pytest.fixture
def no_server() -> str:
  """A URL on a port that nothing listens on."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/pneumoniamnist.npz"


@pytest.fixture
def official_is(monkeypatch):
  """Makes the served file the official one (its md5), as a real download would be."""
  def make(md5: str) -> None:
    official = download.OFFICIAL_FILES["pneumoniamnist"]
    monkeypatch.setitem(download.OFFICIAL_FILES, "pneumoniamnist",
                        download.OfficialFile(official.file_name, official.url, md5))
  return make


def test_download_keeps_the_verified_file_only(server, tmp_path):
  url, payload, md5 = server
  progress = io.StringIO()
  target = tmp_path / "sub" / "pneumoniamnist.npz"
  download.download(f"{url}/good.npz", str(target), md5, progress=progress)
  assert target.read_bytes() == payload
  assert os.listdir(target.parent) == ["pneumoniamnist.npz"]  # no temporary file left
  # Not a terminal: one final progress line, complete.
  assert progress.getvalue().count("\n") == 1 and "100%" in progress.getvalue()


@pytest.mark.parametrize("path,md5,message", [
    ("/good.npz", "0" * 32, r"failed its checksum \(md5 [0-9a-f]{32}, expected 0{32}\)"),
    ("/truncated.npz", None, "stopped after "),
    ("/missing.npz", None, "HTTP 404"),
], ids=["wrong_checksum", "truncated", "http_404"])
def test_failed_download_leaves_nothing(server, tmp_path, path, md5, message):
  url, payload, good_md5 = server
  with pytest.raises(download.DownloadError, match=message) as error:
    download.download(url + path, str(tmp_path / "pneumoniamnist.npz"), md5 or good_md5,
                      progress=None)
  assert "\n" not in str(error.value) and url in str(error.value)
  assert not os.listdir(tmp_path)
  if path == "/truncated.npz":
    assert f"of {len(payload)} bytes" in str(error.value)


def test_no_server_is_a_download_error(no_server, tmp_path):
  with pytest.raises(download.DownloadError, match="could not download pneumoniamnist.npz"):
    download.download(no_server, str(tmp_path / "pneumoniamnist.npz"), "0" * 32, timeout=5,
                      progress=None)
  assert not os.listdir(tmp_path)


def test_find_or_download_downloads_once_then_finds(server, no_server, tmp_path, official_is):
  url, payload, md5 = server
  official_is(md5)
  notes = []
  path = download.find_or_download("pneumoniamnist", str(tmp_path), url=f"{url}/good.npz",
                                   log=notes.append, progress=None)
  assert path == str(tmp_path / "pneumoniamnist.npz") and notes[-1].endswith("(md5 verified).")
  # The second call finds the file and never touches the network.
  notes.clear()
  assert download.find_or_download("pneumoniamnist", str(tmp_path), url=no_server,
                                   log=notes.append) == path
  assert notes == [f"Using {path} (the official MedMNIST file)."]


def test_folder_and_url_come_from_the_environment(server, tmp_path, monkeypatch, official_is):
  url, _, md5 = server
  official_is(md5)
  monkeypatch.setenv(download.FOLDER_ENV, str(tmp_path))
  monkeypatch.setenv(download.URL_ENV, f"{url}/good.npz")
  assert download.default_folder() == str(tmp_path)
  path = download.find_or_download(log=lambda _: None, progress=None)
  assert path == str(tmp_path / "pneumoniamnist.npz") and os.path.isfile(path)


def test_real_pneumoniamnist_user_file_is_used_as_is(shared_data_dir, tmp_path, no_server):
  user_file = tmp_path / "pneumoniamnist.npz"
  shutil.copy(shared_data_dir / "pneumoniamnist.npz", user_file)
  notes = []
  path = download.find_or_download("pneumoniamnist", str(tmp_path), url=no_server,
                                   log=notes.append)
  assert path == str(user_file)
  official = download.OFFICIAL_FILES["pneumoniamnist"].md5
  assert len(notes) == 1 and "as is" in notes[0] and official in notes[0]
  assert download.md5_of(path) != official  # the modified train split: kept, not replaced


def test_a_damaged_user_file_names_the_fix(tmp_path, no_server):
  (tmp_path / "pneumoniamnist.npz").write_bytes(b"not a zip archive")
  with pytest.raises(ValueError, match="is not a readable .npz .*delete it"):
    download.find_or_download("pneumoniamnist", str(tmp_path), url=no_server)


@pytest.mark.parametrize("failure", ["no network", "wrong checksum"])
def test_quickstart_falls_back_to_synthetic_data(server, no_server, tmp_path, monkeypatch, capsys,
                                                 failure):
  # The served file is not the official one, so its download fails the official checksum.
  url = no_server if failure == "no network" else f"{server[0]}/good.npz"
  monkeypatch.setenv(download.URL_ENV, url)
  assert quickstart.choose_data("pneumoniamnist", str(tmp_path / "medmnist")) is None
  lines = [line for line in capsys.readouterr().out.splitlines() if line]
  reason = "could not download" if failure == "no network" else "failed its checksum"
  assert lines[-2].startswith("PneumoniaMNIST is unavailable: ") and reason in lines[-2]
  assert lines[-1].endswith("the numbers will show the pipeline, not the method.")
  assert not os.path.exists(tmp_path / "medmnist" / "pneumoniamnist.npz")


def test_quickstart_runs_the_pneumoniamnist_protocol(server, tmp_path, monkeypatch, capsys):
  data_file = tmp_path / "pneumoniamnist.npz"
  data_file.write_bytes(server[1])
  seen = {}
  monkeypatch.setattr(train_simclr, "train_and_evaluate",
                      lambda config, workdir: seen.update(pretrain=config) or
                      {"preempted": False, "steps": config.total_steps})

  def fake_export(source, destination, **kwargs):
    del source, kwargs
    os.makedirs(destination)
    with open(os.path.join(destination, "model.json"), "w") as f:
      f.write("{}")

  monkeypatch.setattr(export, "export_workdir", fake_export)
  paired = [{"init": "simclr", "label_fraction": f, "n": 3, "mean": 0.05, "ci_low": 0.01,
             "ci_high": 0.09} for f in (0.1, 0.01)]

  def fake_sweep(config, workdir, **kwargs):
    seen.update(sweep=config)
    return {"counts": {"finished": 12}, "paired": paired, "table_file": "t", "plot": "p",
            "results_csv": "c"}

  monkeypatch.setattr(label_fraction_sweep, "run_sweep", fake_sweep)
  result = quickstart.run(str(tmp_path / "qs"), data_file=str(data_file))
  pretrain, sweep = seen["pretrain"], seen["sweep"]
  # Pretraining reads the training images of the user's file, never validation or test.
  assert (pretrain.data.source, pretrain.data.path) == ("medmnist", str(data_file))
  assert pretrain.data.pretrain_split == "train" and pretrain.total_steps == 500
  assert result["export"] == str(tmp_path / "qs" / "pneumoniamnist" / "export" / "step_500")
  assert (sweep.label_fractions, sweep.seeds) == ((0.01, 0.1), (0, 1, 2))
  assert dict(sweep.inits) == {"scratch": "", "simclr": result["export"]}
  assert sweep.init_overrides.simclr.encoder_frozen_fraction == 0.5
  # The grid is valid as planned: 12 runs, every override a key of the fine-tuning config.
  runs = sweep_plan.validate(sweep, check_runs=False)
  assert len(runs) == 12 and {dict(r.overrides)["data.path"] for r in runs} == {str(data_file)}
  assert capsys.readouterr().out.rstrip().endswith(
      "SimCLR - scratch at 1% of the labels, test macro AUC paired over 3 seeds: +0.050 "
      "[95% CI +0.010, +0.090]: SimCLR is ahead (the interval lies above 0).")
