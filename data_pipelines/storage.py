"""One path layer for workdirs and inputs: local folders and object stores (gs://) alike.

Every file the project reads or writes outside Orbax goes through here, on top of
`etils.epath` (the path library Orbax, Grain and clu use themselves). A path with a scheme
(`gs://bucket/run`) stays a URL all the way: it is never turned into a local path.

Cloud Storage backends. epath talks to `gs://` through fsspec + gcsfs (our requirements install
no TensorFlow; where TensorFlow is installed epath prefers its file system unless
`EPATH_USE_TF=false`). gcsfs can be pointed at a local emulator (`STORAGE_EMULATOR_HOST`), which
the tests do (tests/test_gcs.py). Orbax writes array data through TensorStore
(`TENSORSTORE_GCS_HTTP_URL` points it at an emulator).

Atomic small files. `write_text` / `write_json` never leave a half-written file: locally the text
goes to a temporary file in the same folder, then `os.replace`; on an object store an object
appears only when its upload completes, so a single put is atomic already.

Object stores cannot append: `Appender` (metrics.jsonl) and `BinaryAppender` (TensorBoard event
files) append locally and, on a URL, rewrite the object with everything written so far at each
flush (scalar logs are small).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
import uuid
import zipfile
import zlib
from typing import Any, Iterator

from etils import epath
import fsspec.config
import numpy as np

PathLike = str | os.PathLike

# Other processes write into the same bucket (sweep runs, other hosts): gcsfs would otherwise
# answer listings and existence checks from a cache that never expires. fsspec's own settings
# mechanism; a user's FSSPEC_GS_USE_LISTINGS_CACHE / fsspec config wins.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_url(path: PathLike) -> bool:
  """Whether `path` names an object in a store (`gs://...`, `s3://...`) rather than a file."""
  return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
  """An absolute local path, or the URL unchanged (never `./gs:/bucket`)."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def join(path: PathLike, *parts: str) -> str:
  """`os.path.join` that keeps a URL's `//` (`join("gs://b/run", "x")` = "gs://b/run/x").

  As with an absolute path in `os.path.join`, a part that is itself a URL starts over from it.
  """
  path = os.fspath(path)
  for part in parts:
    if is_url(part) or not is_url(path):
      path = part if is_url(part) else os.path.join(path, part)
    elif part:
      path = path.rstrip("/") + "/" + part.lstrip("/")
  return path


def dirname(path: PathLike) -> str:
  path = os.fspath(path)
  if not is_url(path):
    return os.path.dirname(path)
  return path.rstrip("/").rsplit("/", 1)[0]


def basename(path: PathLike) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def as_path(path: PathLike) -> epath.Path:
  return epath.Path(os.fspath(path))


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def isfile(path: PathLike) -> bool:
  return as_path(path).is_file()


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def makedirs(path: PathLike) -> None:
  """Creates a folder and its parents (on an object store: a no-op marker, which is harmless)."""
  if is_url(path):
    as_path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(os.fspath(path), exist_ok=True)


def listdir(path: PathLike) -> list[str]:
  """Names (not paths) of the entries in a folder, sorted."""
  if not is_url(path):
    return sorted(os.listdir(os.fspath(path)))
  return sorted(p.name for p in as_path(path).iterdir())


def glob(pattern: str) -> list[str]:
  """Sorted matches of a shell pattern; the folder part must not itself contain wildcards."""
  if not is_url(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return sorted(glob_lib.glob(pattern))
  folder, name = dirname(pattern), basename(pattern)
  if any(c in folder for c in "*?["):
    raise ValueError(f"{pattern}: wildcards only in the last part of a URL pattern")
  return sorted(join(folder, p.name) for p in as_path(folder).glob(name))


def open_file(path: PathLike, mode: str = "r", encoding: str | None = None):
  """`open` for local paths and URLs (binary or text)."""
  if not is_url(path):
    return open(os.fspath(path), mode, encoding=encoding)  # pylint: disable=consider-using-with
  if "b" in mode:
    return as_path(path).open(mode)
  return as_path(path).open(mode, encoding=encoding or "utf-8")


def read_text(path: PathLike) -> str:
  with open_file(path, "r", encoding="utf-8") as f:
    return f.read()


def read_bytes(path: PathLike) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` atomically: the file is either absent/old or complete, never half-written."""
  path = os.fspath(path)
  if is_url(path):
    as_path(path).write_bytes(data)  # one upload: the object appears when it is complete
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  # A fresh name opened exclusively: the file gets the usual permissions (umask), where
  # mkstemp's 0600 would hide a shared corpus's side files from other users.
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "xb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def put_file(local_path: PathLike, path: PathLike, chunk_bytes: int = 64 << 20) -> None:
  """Moves a finished local file to `path` (local or URL) without a half-written `path`.

  For large files written by a library that needs a local file (ArrayRecord shards), which
  `write_bytes` would hold in memory. Locally: a rename when both are on one file system, else
  a copy to a temporary file beside `path` and a rename. On an object store: an upload under a
  temporary name, then a rename (a server-side copy) to `path`; an upload cut short, whose
  client might still commit what it had sent when the file is closed, so leaves at most a
  temporary object, never a partial `path`. `local_path` is removed.
  """
  local_path, path = os.fspath(local_path), os.fspath(path)
  temporary = join(dirname(path), f".{basename(path)}.{uuid.uuid4().hex}.tmp")
  if not is_url(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
      os.replace(local_path, path)
      return
    except OSError as e:
      if e.errno != errno.EXDEV:  # Not "another file system": a real failure.
        raise
  try:
    if is_url(path):
      with open(local_path, "rb") as source, as_path(temporary).open("wb") as target:
        shutil.copyfileobj(source, target, chunk_bytes)
    else:
      shutil.copyfile(local_path, temporary)
    rename(temporary, path)
  except BaseException:
    if exists(temporary):
      remove(temporary)
    raise
  os.remove(local_path)


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` (UTF-8) atomically; see `write_bytes`."""
  write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
  """`value` with NumPy scalars as Python numbers and NaN / inf as None (JSON has neither)."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return None if not math.isfinite(float(value)) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
  write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: PathLike) -> Any:
  """The JSON value in a file.

  Raises:
    json.JSONDecodeError: the file is not valid JSON (a write cut short, a partial copy); the
      message names the file, which json's own does not.
    ValueError: the file is not UTF-8 text, naming it.
  """
  try:
    text = read_text(path)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text ({e}): corrupt or not a JSON file?") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    # Still a JSONDecodeError (a ValueError): callers that catch either keep working.
    raise json.JSONDecodeError(f"{path} is not valid JSON (truncated or corrupt?): {e.msg}",
                               e.doc, e.pos) from None


def _not_a_valid_npz(path: PathLike, error: BaseException) -> ValueError:
  return ValueError(f"{os.fspath(path)} is not a valid .npz: truncated or corrupt download? "
                    f"({type(error).__name__}: {error}); download the file again")


@contextlib.contextmanager
def open_npz(path: PathLike) -> Iterator[Any]:
  """`np.load` of an `.npz` (local, or a URL read in one request); no pickles.

  Raises:
    ValueError: the file is not a readable `.npz` (cut short or damaged), naming it; also when
      an array inside fails to decompress while it is read in the `with` block.
  """
  source = io.BytesIO(read_bytes(path)) if is_url(path) else os.fspath(path)
  # What NumPy raises for a damaged archive: no zip directory at the end (a cut-short download),
  # an empty file, a non-zip file (it falls back to unpickling, which allow_pickle=False
  # refuses), or a member whose compressed data or CRC is wrong (raised on reading it).
  damaged = (zipfile.BadZipFile, zlib.error, EOFError)
  try:
    npz = np.load(source, allow_pickle=False)
  except (*damaged, ValueError) as e:
    raise _not_a_valid_npz(path, e) from None
  if not isinstance(npz, np.lib.npyio.NpzFile):  # a bare .npy saved under an .npz name
    raise ValueError(f"{os.fspath(path)} is a single .npy array, not an .npz archive of named "
                     "arrays")
  with npz:
    try:
      yield npz
    except damaged as e:
      raise _not_a_valid_npz(path, e) from None


def remove(path: PathLike) -> None:
  if is_url(path):
    as_path(path).unlink()
  else:
    os.remove(os.fspath(path))


def rmtree(path: PathLike) -> None:
  as_path(path).rmtree()


def rename(src: PathLike, dst: PathLike) -> None:
  """Renames a file or folder (on an object store: copy + delete, so not atomic there)."""
  if not is_url(src) and not is_url(dst):
    os.replace(os.fspath(src), os.fspath(dst))
  else:
    as_path(src).rename(as_path(dst))


class Appender:
  """A text file that grows line by line (metrics.jsonl), locally or on an object store.

  Locally: append mode, flushed per write. On an object store, where objects cannot grow, the
  lines written so far (including what the object held when this run started: a resumed run
  continues the file) are kept in memory and the whole object is rewritten at each `flush`.

  A file that does not end with a newline (its last line was cut short: the run was killed
  mid-write, or the disk filled up) gets one before anything is appended, so that the partial
  line stays one unreadable line on its own instead of swallowing the next record.
  """

  def __init__(self, path: PathLike):
    self.path = os.fspath(path)
    self._remote = is_url(self.path)
    if self._remote:
      earlier = read_text(self.path) if exists(self.path) else ""
      self._lines = [earlier + "\n"] if earlier and not earlier.endswith("\n") else [earlier]
      self._file = None
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      cut_short = _ends_without_newline(self.path)
      self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
      if cut_short:
        self._file.write("\n")
        self._file.flush()

  def write(self, text: str) -> None:
    if self._remote:
      self._lines.append(text)
    else:
      self._file.write(text)

  def flush(self) -> None:
    if self._remote:
      write_text(self.path, "".join(self._lines))
    else:
      self._file.flush()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None


class BinaryAppender:
  """A binary file that only grows (a TensorBoard event file), locally or on an object store.

  Locally: append mode; `flush` pushes the bytes to the file. On an object store, where objects
  cannot grow, the bytes written so far (after what the object already held) are kept in memory
  and the whole object is uploaded again at each `flush` that follows a write: one upload, so
  the object is always a complete earlier version, never half-written.
  """

  def __init__(self, path: PathLike):
    self.path = os.fspath(path)
    self._remote = is_url(self.path)
    self._dirty = False
    if self._remote:
      self._chunks = [read_bytes(self.path)] if exists(self.path) else []
      self._file = None
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._chunks = []
      self._file = open(self.path, "ab")  # pylint: disable=consider-using-with

  def write(self, data: bytes) -> None:
    if self._remote:
      self._chunks.append(bytes(data))
    else:
      self._file.write(data)
    self._dirty = True

  def flush(self) -> None:
    if not self._dirty:
      return
    if self._remote:
      write_bytes(self.path, b"".join(self._chunks))
    else:
      self._file.flush()
    self._dirty = False

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None


def _ends_without_newline(path: str) -> bool:
  """Whether a local file is non-empty and its last byte is not a newline."""
  try:
    with open(path, "rb") as f:
      if f.seek(0, os.SEEK_END) == 0:
        return False
      f.seek(-1, os.SEEK_END)
      return f.read(1) != b"\n"
  except FileNotFoundError:
    return False


def read_lines(path: PathLike) -> Iterator[str]:
  yield from read_text(path).splitlines()
