"""MedMNIST files: found where the medmnist package keeps them, or downloaded with their MD5.

MedMNIST v2 (Yang et al., Scientific Data 2023; CC BY 4.0) publishes each dataset as one `.npz`
on Zenodo. The medmnist package (pip) stores them in `~/.medmnist/`, so a file it downloaded
is found here too; `MEDMNIST_DIR` names another folder.

Trust follows who put the file there: a file already in the folder is the user's and is used as
is (with a one-line note when its MD5 is not the official one, e.g. a modified split); a
download must match the official MD5, or it is discarded. A download is written to a temporary
file in the same folder and renamed only once its MD5 matches, so no half-written or wrong file
is ever left under the final name.

Only the standard library speaks HTTP here (urllib, with a timeout): the runtime needs no
client package for one file of a few megabytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from typing import Callable, TextIO

# The folder that overrides ~/.medmnist (the Makefile's MEDMNIST_DIR sets it too).
FOLDER_ENV = "MEDMNIST_DIR"
# Downloads from this URL instead of the official one (a mirror, or a local server in tests); the
# official MD5 still applies.
URL_ENV = "REMEDIS_MEDMNIST_URL"
DEFAULT_TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 16
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class OfficialFile:
  """One file of the official MedMNIST record: its name, where it is published, its MD5."""
  file_name: str
  url: str
  md5: str


# Copied from the medmnist package (github.com/MedMNIST/MedMNIST, medmnist/info.py, v3.0.2,
# Apache-2.0): Zenodo record 10519652 (MedMNIST+), whose 28 px files are those of MedMNIST v2.
OFFICIAL_FILES = {
    "pneumoniamnist": OfficialFile(
        file_name="pneumoniamnist.npz",
        url="https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        md5="28209eda62fecd6e6a2d98b1501bb15f"),
}


class DownloadError(Exception):
  """A download that did not produce the verified file; the message is one line.

  Nothing is left behind: the partial or unverified file has been removed.
  """


def default_folder() -> str:
  """$MEDMNIST_DIR when set, else `~/.medmnist` (the medmnist package's folder)."""
  return os.path.expanduser(os.environ.get(FOLDER_ENV) or os.path.join("~", ".medmnist"))


def md5_of(path: str) -> str:
  """The MD5 hex digest of a file, read in chunks."""
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def check_medmnist_layout(path: str) -> None:
  """Checks that `path` is an `.npz` with the MedMNIST keys, without loading the arrays.

  Raises:
    ValueError: not a readable zip archive, or a `<split>_images` / `<split>_labels` key is
      missing; names the file and the fix.
  """
  fix = f"delete it to download the official file, or name another folder with {FOLDER_ENV}"
  try:
    with zipfile.ZipFile(path) as archive:
      names = {name.removesuffix(".npy") for name in archive.namelist()}
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{path} is not a readable .npz ({e}); {fix}") from None
  missing = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")
             if f"{split}_{kind}" not in names]
  if missing:
    raise ValueError(f"{path} lacks the MedMNIST key(s) {', '.join(missing)} (it has: "
                     f"{', '.join(sorted(names))}); {fix}")


def _megabytes(num_bytes: float) -> str:
  return f"{num_bytes / 1e6:.1f} MB"


class ProgressLine:
  """A download's progress on one line of a stream: percentage, size and speed.

  On a terminal the line is redrawn in place (at most every `min_interval_s`); elsewhere (a
  log file, CI) only the final line is written, so logs do not fill with carriage returns.
  """

  def __init__(self, label: str, total: int | None, stream: TextIO | None,
               min_interval_s: float = 0.2):
    self.label = label
    self.total = total
    self.stream = stream
    self.min_interval_s = min_interval_s
    self.start = time.monotonic()
    self.last_drawn = -float("inf")
    self.received = 0
    self.live = bool(stream is not None and getattr(stream, "isatty", lambda: False)())

  def text(self) -> str:
    elapsed = max(time.monotonic() - self.start, 1e-6)
    speed = f"{_megabytes(self.received / elapsed)}/s"
    if self.total:
      return (f"{self.label}: {100 * self.received / self.total:3.0f}% "
              f"{_megabytes(self.received)} of {_megabytes(self.total)}, {speed}")
    return f"{self.label}: {_megabytes(self.received)}, {speed}"

  def update(self, received: int) -> None:
    self.received = received
    now = time.monotonic()
    if self.live and now - self.last_drawn >= self.min_interval_s:
      self.last_drawn = now
      self.stream.write("\r" + self.text())
      self.stream.flush()

  def close(self) -> None:
    if self.stream is not None:
      self.stream.write(("\r" if self.live else "") + self.text() + "\n")
      self.stream.flush()


def download(url: str, path: str, md5: str, *, timeout: float = DEFAULT_TIMEOUT_S,
             progress: TextIO | None = sys.stderr) -> None:
  """Downloads `url` to `path`, which appears only if the bytes have MD5 `md5`.

  Args:
    url: what to fetch (http, https or file).
    path: the final file; its folder is created.
    md5: the expected MD5 hex digest.
    timeout: seconds for the connection and for each read.
    progress: where the progress line goes (None: nowhere).

  Raises:
    DownloadError: no connection (no network, no server, a timeout), an HTTP error, a download
      cut short, a wrong MD5, or a folder that cannot be written; one line, naming the URL.
      No file is left behind.
  """
  name = os.path.basename(path)
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
  except OSError as e:
    raise DownloadError(f"cannot write {name} to {folder} ({e.strerror or e})") from None
  try:
    with os.fdopen(handle, "wb") as out:
      digest, received, total = _fetch(url, out, name, timeout, progress)
    if total is not None and received != total:
      raise DownloadError(f"the download of {name} from {url} stopped after {received} of "
                          f"{total} bytes")
    if digest != md5:
      raise DownloadError(f"the download of {name} from {url} failed its checksum (md5 "
                          f"{digest}, expected {md5})")
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _fetch(url: str, out, name: str, timeout: float,
           progress: TextIO | None) -> tuple[str, int, int | None]:
  """Streams `url` into `out`; returns (md5 hex digest, bytes received, Content-Length)."""
  digest = hashlib.md5()
  received, total = 0, None
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
      length = response.headers.get("Content-Length")
      total = int(length) if length and length.isdigit() else None
      bar = ProgressLine(f"Downloading {name}", total, progress)
      try:
        for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
          out.write(chunk)
          digest.update(chunk)
          received += len(chunk)
          bar.update(received)
      finally:
        bar.close()
  except urllib.error.HTTPError as e:
    raise DownloadError(f"could not download {name} from {url}: HTTP {e.code} {e.reason}"
                        ) from None
  except urllib.error.URLError as e:
    hint = " (no network?)" if isinstance(e.reason, OSError) else ""
    raise DownloadError(f"could not download {name} from {url}: {e.reason}{hint}") from None
  except http.client.IncompleteRead as e:
    raise DownloadError(f"the download of {name} from {url} stopped after "
                        f"{received + len(e.partial)} of {total} bytes") from None
  except (http.client.HTTPException, OSError, ValueError) as e:
    # A reset or timed-out connection mid-transfer, a malformed response or URL.
    reason = "timed out" if isinstance(e, TimeoutError) else (str(e) or type(e).__name__)
    raise DownloadError(f"could not download {name} from {url}: {reason} after {received} "
                        "bytes") from None
  return digest.hexdigest(), received, total


def find_or_download(flag: str = "pneumoniamnist", folder: str | None = None, *,
                     url: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                     log: Callable[[str], None] = print,
                     progress: TextIO | None = sys.stderr) -> str:
  """The path of `<folder>/<flag>.npz`: the user's file if present, else a verified download.

  Args:
    flag: a key of OFFICIAL_FILES.
    folder: where to look and download to (default: `default_folder()`).
    url: where to download from (default: $REMEDIS_MEDMNIST_URL, else the official record).
    timeout: seconds for the connection and each read.
    log: takes the one-line notes (which file is used, and why).
    progress: where the download's progress line goes (None: nowhere).

  Returns:
    The file's path.

  Raises:
    DownloadError: the file is absent and the download failed (see `download`).
    ValueError: the file present is not a MedMNIST .npz (`check_medmnist_layout`).
  """
  official = OFFICIAL_FILES[flag]
  folder = os.path.expanduser(folder or default_folder())
  path = os.path.join(folder, official.file_name)
  if os.path.isfile(path):
    check_medmnist_layout(path)
    digest = md5_of(path)
    if digest == official.md5:
      log(f"Using {path} (the official MedMNIST file).")
    else:
      log(f"Using {path} as is: its md5 {digest} is not the official file's "
          f"({official.md5}), so its splits may differ from the published ones.")
    return path
  url = url or os.environ.get(URL_ENV) or official.url
  log(f"{official.file_name} is not in {folder}; downloading it from {url}")
  download(url, path, official.md5, timeout=timeout, progress=progress)
  log(f"Saved {path} (md5 verified).")
  return path
