"""WebDataset tar shards as img2dataset writes them: reading by an index of member offsets.

A shard ``00000.tar`` holds samples, each a run of members named ``<key>.<ext>``: the image
(``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp``), the caption (``.txt``) and the other fields
(``.json``: an object; its ``question`` / ``answer``, the columns of task modules' fields and
``image_key`` / ``url`` (records of one image share it) are read, the rest ignored). ``index(path)`` reads the member headers once (512 bytes each;
the data is skipped) and records where each sample's members lie, so that any sample is
then one positioned read per member: random access, as grain's MapDataset wants.

A shard cut short (a copy interrupted, a disk full) keeps the samples before the cut; a
sample whose member runs past the end of the file is marked, and reading it says
``truncated_tar``.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import tarfile
import threading

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json")


@dataclasses.dataclass(frozen=True)
class Sample:
  """Where one sample's members lie in its shard: {extension: (data offset, size)}."""

  key: str
  members: dict[str, tuple[int, int]]
  truncated: bool = False  # a member runs past the end of the file


@dataclasses.dataclass(frozen=True)
class TarIndex:
  path: str
  samples: tuple[Sample, ...]
  damaged: str = ""  # why reading the headers stopped early ("" when it did not)


def _split_name(name: str) -> tuple[str, str]:
  """``dir/000001.jpg`` -> (``dir/000001``, ``jpg``); WebDataset's key is everything before
  the first dot of the base name."""
  folder, _, base = name.rpartition("/")
  stem, _, ext = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _open(path: str):
  from etils import epath

  return epath.Path(path).open("rb")


def index(path: str) -> TarIndex:
  """The samples of a tar shard, in file order (a sample's members are adjacent)."""
  samples: list[Sample] = []
  damaged = ""
  with _open(path) as f:
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    key, members, truncated = None, {}, False

    def close():
      if key is not None:
        samples.append(Sample(key, members, truncated))

    try:
      with tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
          if not info.isfile():
            continue
          k, ext = _split_name(info.name)
          if k != key:
            close()
            key, members, truncated = k, {}, False
          members[ext] = (info.offset_data, info.size)
          truncated = truncated or info.offset_data + info.size > size
        # tarfile stops quietly at a header cut short; a whole archive ends in two zero blocks.
        if tar.offset + 2 * tarfile.BLOCKSIZE > size:
          damaged, truncated = "the file ends without the end-of-archive blocks (cut short)", True
    except (tarfile.TarError, EOFError, OSError) as e:
      damaged, truncated = f"{type(e).__name__}: {e}", True
    close()
  return TarIndex(path, tuple(samples), damaged)


# Open shard files a reader keeps: far under the usual limit of 1024 descriptors per process,
# whatever the number of shards a host reads.
MAX_OPEN_FILES = 64


class _Open:
  """One open shard: its handle, a lock for file systems without positioned reads, and the
  reads in progress (an evicted file is closed when its last read ends)."""

  def __init__(self, path: str):
    if "://" in path:
      self.handle, self.lock = _open(path), threading.Lock()
    else:
      self.handle, self.lock = os.open(path, os.O_RDONLY), None
    self.readers, self.evicted = 0, False

  def read(self, offset: int, size: int) -> bytes:
    if self.lock is None:
      return os.pread(self.handle, size, offset)
    with self.lock:
      self.handle.seek(offset)
      return self.handle.read(size)

  def close(self) -> None:
    if self.lock is None:
      os.close(self.handle)
    else:
      self.handle.close()


class Reader:
  """Positioned reads from shards, many threads at once: ``os.pread`` on local files, a
  locked seek + read on other file systems. The ``max_open`` files read last are kept open;
  the one read longest ago is closed to open another."""

  def __init__(self, max_open: int = MAX_OPEN_FILES):
    self.max_open = max_open
    self._lock = threading.Lock()
    self._files: collections.OrderedDict[str, _Open] = collections.OrderedDict()

  @property
  def open_files(self) -> int:
    with self._lock:
      return len(self._files)

  def read(self, path: str, offset: int, size: int) -> bytes:
    with self._lock:
      entry = self._files.get(path)
      if entry is None:
        entry = self._files[path] = _Open(path)
        while len(self._files) > self.max_open:
          self._evict(self._files.popitem(last=False)[1])
      else:
        self._files.move_to_end(path)
      entry.readers += 1
    try:
      return entry.read(offset, size)
    finally:
      with self._lock:
        entry.readers -= 1
        if entry.evicted and entry.readers == 0:
          entry.close()

  @staticmethod
  def _evict(entry: _Open) -> None:
    entry.evicted = True
    if entry.readers == 0:  # else the last read in progress closes it
      entry.close()

  def close(self) -> None:
    with self._lock:
      while self._files:
        self._evict(self._files.popitem(last=False)[1])

  def __getstate__(self):  # a copy (another process) opens its own files
    return {"max_open": self.max_open}

  def __setstate__(self, state):
    self.__init__(state["max_open"])


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class TarWriter:
  """Writes samples as img2dataset does: ``<key>.<image ext>``, ``<key>.txt``,
  ``<key>.json``, in that order; members are dated 0 and owned by nobody, so the same
  samples give the same bytes."""

  def __init__(self, path: str):
    self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

  def _add(self, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    self._tar.addfile(info, io.BytesIO(data))

  def write(self, key: str, image: bytes, image_ext: str, caption: str | None, meta: dict):
    self._add(f"{key}.{image_ext}", image)
    if caption is not None:
      self._add(f"{key}.txt", caption.encode("utf-8"))
    self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())

  def close(self) -> None:
    self._tar.close()
