"""Random-access record sources (grain `RandomAccessDataSource` protocol: `__len__`, `__getitem__`).

Every source yields `RawRecord(where, data)`:
  where  "path:LINE" (JSONL, 1-based line), "path:record N" (ArrayRecord) or "tfds:name:split:N",
         used in every warning and error about the record;
  data   the JSON bytes of the record (JSONL line / ArrayRecord record), or an already-decoded
         dict (TFDS). `parse_record` turns it into a dict, raising `BadRecordError`.

Record formats (the JSON objects):
  image-text: {"image": path (relative to image_root, or absolute) | "image_b64"/"binary": base64,
               "caption": str | [str, ...]}
  regions:    {"image"/"image_b64"/"binary": ..., "caption": optional image-level caption,
               "elems": [{"bbox" (or "bb"): [x, y, w, h] pixels, "caption": str | [str],
                          "attributes": optional str | [str]}, ...]}

`make_source(files)` expands globs and concatenates JSONL (any other suffix), JSON-list files (a
`*.json` file holding one array of records, as the reference's fine-tuning annotations are),
ArrayRecord (`*.array_record`, `*.arrayrecord`, `*.array_record-*`) and TFDS (`tfds:name:split`).
Sources are picklable (file handles are reopened lazily in each process).
"""
from __future__ import annotations

import bisect
import glob
import json
import os
import threading
from typing import Any, NamedTuple, Sequence

import numpy as np


class BadRecordError(ValueError):
  """A record that must be skipped (malformed JSON, missing image, empty caption, ...)."""


class BadDataError(RuntimeError):
  """Too many bad records (training), or any bad record in evaluation data."""


class RawRecord(NamedTuple):
  where: str
  data: bytes | dict


def parse_record(raw: RawRecord) -> dict:
  """JSON bytes (or a dict) -> dict. Raises BadRecordError with the reason."""
  data = raw.data
  if isinstance(data, dict):
    return data
  try:
    text = bytes(data).decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRecordError(f"line is not valid UTF-8 ({e})") from e
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRecordError(f"malformed JSON ({e})") from e
  if not isinstance(obj, dict):
    raise BadRecordError(f"record is a JSON {type(obj).__name__}, expected an object")
  return obj


def _index_lines(path: str, chunk_size: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Byte offsets, lengths and 1-based line numbers of the non-empty lines of a file."""
  newlines = []
  size = 0
  with open(path, "rb") as f:
    while True:
      chunk = f.read(chunk_size)
      if not chunk:
        break
      newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
      size += len(chunk)
  nl = np.concatenate(newlines) if newlines else np.zeros((0,), np.int64)
  starts = np.concatenate([[0], nl + 1]).astype(np.int64)
  ends = np.concatenate([nl, [size]]).astype(np.int64)
  lengths = ends - starts
  linenos = np.arange(1, len(starts) + 1, dtype=np.int64)
  keep = lengths > 0
  return starts[keep], lengths[keep].astype(np.int64), linenos[keep]


class JsonlSource:
  """Random access over the lines of one or more JSON-lines files (line offsets indexed once)."""

  def __init__(self, paths: Sequence[str]):
    self.paths = [os.fspath(p) for p in paths]
    self._starts, self._lengths, self._linenos, self._cum = [], [], [], [0]
    for p in self.paths:
      s, n, l = _index_lines(p)
      self._starts.append(s)
      self._lengths.append(n)
      self._linenos.append(l)
      self._cum.append(self._cum[-1] + len(s))
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._cum[-1]

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_fds"] = {}
    state["_lock"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _fd(self, k: int) -> int:
    fd = self._fds.get(k)
    if fd is None:
      with self._lock:
        fd = self._fds.get(k)
        if fd is None:
          fd = os.open(self.paths[k], os.O_RDONLY)
          self._fds[k] = fd
    return fd

  def __getitem__(self, index: int) -> RawRecord:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    k = bisect.bisect_right(self._cum, index) - 1
    i = index - self._cum[k]
    data = os.pread(self._fd(k), int(self._lengths[k][i]), int(self._starts[k][i]))
    return RawRecord(f"{self.paths[k]}:{int(self._linenos[k][i])}", data)

  def __repr__(self) -> str:
    return f"JsonlSource({len(self.paths)} files, {len(self)} records)"

  def __del__(self):
    try:
      for fd in self._fds.values():
        os.close(fd)
    except Exception:  # pylint: disable=broad-except  (interpreter shutdown, already closed)
      pass


def is_json_list(path: str) -> bool:
  """A `.json` file whose first non-blank character opens an array."""
  if not path.lower().endswith(".json"):
    return False
  with open(path, "rb") as f:
    head = f.read(4096).lstrip()
  return head.startswith(b"[")


class JsonListSource:
  """The records of one or more `.json` files each holding a JSON array (loaded on first use)."""

  def __init__(self, paths: Sequence[str]):
    self.paths = [os.fspath(p) for p in paths]
    self._records: list[list[Any]] | None = None
    self._cum = [0]
    for records in self._load():
      self._cum.append(self._cum[-1] + len(records))

  def _load(self) -> list[list[Any]]:
    if self._records is None:
      loaded = []
      for p in self.paths:
        with open(p, "rb") as f:
          try:
            data = json.load(f)
          except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadDataError(f"{p}: not a JSON array of records ({e})") from e
        if not isinstance(data, list):
          raise BadDataError(f"{p}: expected a JSON array of records, found {type(data).__name__}")
        loaded.append(data)
      self._records = loaded
    return self._records

  def __len__(self) -> int:
    return self._cum[-1]

  def __getstate__(self):
    return dict(self.__dict__, _records=None)  # workers reload instead of pickling the lists

  def __getitem__(self, index: int) -> RawRecord:
    k = bisect.bisect_right(self._cum, index) - 1
    item = self._load()[k][index - self._cum[k]]
    where = f"{self.paths[k]}:item {index - self._cum[k]}"
    if not isinstance(item, dict):
      return RawRecord(where, json.dumps(item).encode("utf-8"))  # parse_record names the problem
    return RawRecord(where, item)

  def __repr__(self) -> str:
    return f"JsonListSource({self.paths!r}, {len(self)} records)"


class ArrayRecordSource:
  """ArrayRecord files whose records are JSON-line bytes (see tools/jsonl_to_arrayrecord.py)."""

  def __init__(self, paths: Sequence[str]):
    import grain  # pylint: disable=g-import-not-at-top

    self.paths = [os.fspath(p) for p in paths]
    self._sources = [grain.sources.ArrayRecordDataSource([p]) for p in self.paths]
    self._cum = [0]
    for s in self._sources:
      self._cum.append(self._cum[-1] + len(s))

  def __len__(self) -> int:
    return self._cum[-1]

  def __getitem__(self, index: int) -> RawRecord:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    k = bisect.bisect_right(self._cum, index) - 1
    i = index - self._cum[k]
    return RawRecord(f"{self.paths[k]}:record {i}", self._sources[k][i])

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"


def _tfds_value(v: Any) -> Any:
  """TFDS numpy values -> JSON-like Python values (bytes -> str; uint8 images stay arrays)."""
  if isinstance(v, dict):
    return {k: _tfds_value(x) for k, x in v.items()}
  if isinstance(v, (bytes, np.bytes_)):
    return bytes(v).decode("utf-8", errors="replace")
  if isinstance(v, np.ndarray):
    if v.dtype.kind in ("S", "O"):
      return [_tfds_value(x) for x in v.tolist()]
    if v.dtype == np.uint8 and v.ndim == 3:
      return v  # decoded image [H, W, C]
    return v.tolist()
  if isinstance(v, np.generic):
    return v.item()
  return v


class TfdsSource:
  """Adapter over `tfds.data_source(name, split, data_dir)` returning the same record dicts.

  Works without TensorFlow for datasets stored as ArrayRecord whose builder exists locally.
  Features are renamed by `rename` (e.g. {"captions": "caption"}); strings are decoded to str and
  a uint8 [H, W, 3] image feature is passed through as an array (the pipeline accepts arrays in
  the image key). `data_source` may be given directly (any sequence of feature dicts).
  """

  def __init__(
      self,
      name: str = "",
      split: str = "train",
      data_dir: str | None = None,
      rename: dict[str, str] | None = None,
      data_source: Sequence[dict] | None = None,
  ):
    if data_source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

      data_source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    self.name, self.split = name, split
    self._ds = data_source
    self._rename = dict(rename or {})

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> RawRecord:
    index = int(index)
    ex = self._ds[index]
    rec = {self._rename.get(k, k): _tfds_value(v) for k, v in ex.items()}
    return RawRecord(f"tfds:{self.name}:{self.split}:{index}", rec)


class ConcatSource:
  """Concatenation of sources (one index space)."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self._cum = [0]
    for s in self.sources:
      self._cum.append(self._cum[-1] + len(s))

  def __len__(self) -> int:
    return self._cum[-1]

  def __getitem__(self, index: int) -> RawRecord:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    k = bisect.bisect_right(self._cum, index) - 1
    return self.sources[k][index - self._cum[k]]

  def __repr__(self) -> str:
    return f"ConcatSource({self.sources})"


def _is_array_record(path: str) -> bool:
  base = os.path.basename(path)
  return base.endswith((".array_record", ".arrayrecord")) or ".array_record-" in base


def expand_files(files: Sequence[str]) -> list[str]:
  """Expands globs (sorted); keeps "tfds:" entries; raises if a pattern matches nothing."""
  out = []
  for f in files:
    if f.startswith("tfds:"):
      out.append(f)
      continue
    matches = sorted(glob.glob(os.path.expanduser(f)))
    if not matches:
      raise FileNotFoundError(f"data file pattern {f!r} matches no file")
    out.extend(matches)
  return out


def make_source(files: Sequence[str], tfds_data_dir: str = "") -> Any:
  """One random-access source over all `files` (see the module docstring)."""
  if isinstance(files, str):
    files = [files]
  paths = expand_files(files)
  if not paths:
    raise ValueError("no data files given")
  sources, run, run_kind = [], [], None

  def flush():
    if run:
      kinds = {"ar": ArrayRecordSource, "json": JsonListSource, "jsonl": JsonlSource}
      sources.append(kinds[run_kind](run))

  for p in paths:
    if p.startswith("tfds:"):
      flush()
      run, run_kind = [], None
      parts = p.split(":")
      if len(parts) < 3:
        raise ValueError(f"TFDS entry must be 'tfds:name:split', got {p!r}")
      sources.append(TfdsSource(parts[1], parts[2], data_dir=tfds_data_dir or None))
      continue
    kind = "ar" if _is_array_record(p) else "json" if is_json_list(p) else "jsonl"
    if kind != run_kind:
      flush()
      run, run_kind = [], kind
    run.append(p)
  flush()
  source = sources[0] if len(sources) == 1 else ConcatSource(sources)
  if len(source) == 0:
    raise ValueError(f"data files {list(files)} hold no records")
  return source


def write_array_record(records: Sequence[bytes], path: str) -> None:
  """Writes byte records to one ArrayRecord file (group_size 1: cheap random access)."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
  try:
    for r in records:
      writer.write(r)
  finally:
    writer.close()


def jsonl_to_array_record(in_path: str, out_path: str) -> int:
  """Copies every non-empty line of a JSONL file into an ArrayRecord file; returns the count."""
  src = JsonlSource([in_path])
  write_array_record((src[i].data for i in range(len(src))), out_path)
  return len(src)
