"""Bad records of streamed shards: skipped, counted by reason, and a stop past a limit.

A shard record that cannot feed training (``REASONS``) is skipped where it is read, and
counted; the train loop shows the counts in the progress line and ``metrics.jsonl`` and
stops with one ``error:`` line once more than ``data.max_bad_fraction`` of the records read
are bad (after ``MIN_RECORDS`` records, so that one bad record among the first few does not
end a run).
"""

from __future__ import annotations

import collections
import dataclasses
import threading

from m6_jax.errors import BadDataError

REASONS = {
  "truncated_tar": "a sample cut off by the end of its tar shard, or in a tar that cannot be read",
  "missing_image": "a tar sample without an image member (.jpg, .jpeg, .png, .webp)",
  "null_bytes": "a Parquet row whose image bytes are null",
  "corrupt_image": "Pillow cannot decode the image (corrupt or truncated bytes)",
  "oversized_image": "an image of more than data.max_image_pixels pixels",
  "missing_caption": "no caption (.txt / the text column) and no other record field's text",
  "bad_text": "a caption that is not UTF-8, or a .json member that is not a JSON object",
}

MIN_RECORDS = 100


class Skip(Exception):
  """A record to skip, with the reason (a key of REASONS) and what was wrong."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Dropped:
  """A record a train stream read but does not batch: a bad one (``reason``, a key of
  REASONS; ``example``: where and what) or, reason "", one its task cannot use. The stream
  counts it where it is consumed, in order, so the counts match the iterator's position."""

  reason: str = ""
  example: str = ""


def dropped(skip: Skip, where: str) -> Dropped:
  return Dropped(skip.reason, f"{where}: {skip.detail}" if where else skip.detail)


class BadRecords:
  """Thread-safe counts of the records read and of the bad ones by reason."""

  def __init__(self):
    self._lock = threading.Lock()
    self.read = 0
    self.bad: collections.Counter = collections.Counter()
    self.examples: dict[str, str] = {}  # reason -> the first record skipped for it

  def count(self, skip: Skip | None, where: str = "") -> None:
    if skip is None:
      self.add("")
    else:
      self.add(skip.reason, dropped(skip, where).example)

  def add(self, reason: str, example: str = "") -> None:
    """One record read; bad for ``reason`` unless it is ""."""
    with self._lock:
      self.read += 1
      if reason:
        self.bad[reason] += 1
        self.examples.setdefault(reason, example)

  def state(self) -> dict:
    """The counts as JSON, saved with the data iterator's position."""
    with self._lock:
      return {"read": self.read, "bad": dict(self.bad), "examples": dict(self.examples)}

  def load(self, state: dict | None) -> None:
    """The counts of ``state`` (``state()``'s, or ``merged``'s); None: zero."""
    state = state or {}
    with self._lock:
      self.read = int(state.get("read", 0))
      self.bad = collections.Counter({r: int(n) for r, n in state.get("bad", {}).items()})
      self.examples = dict(state.get("examples", {}))

  @staticmethod
  def merged(states: list[dict]) -> dict:
    """The sum of several ``state()``s (a resume on fewer processes)."""
    total = BadRecords()
    for state in states:
      part = BadRecords()
      part.load(state)
      total.read += part.read
      total.bad.update(part.bad)
      total.examples = {**part.examples, **total.examples}
    return total.state()

  def snapshot(self) -> tuple[int, dict[str, int]]:
    with self._lock:
      return self.read, dict(self.bad)

  def metrics(self) -> dict[str, float]:
    """For metrics.jsonl: records read and bad ones by reason, since the run started."""
    read, bad = self.snapshot()
    out = {"data_records_read": float(read), "data_records_bad": float(sum(bad.values()))}
    out.update({f"data_bad_{reason}": float(n) for reason, n in sorted(bad.items())})
    return out

  def summary(self) -> str:
    """For the progress line: "" when no record was bad."""
    read, bad = self.snapshot()
    if not bad:
      return ""
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(bad.items()))
    return f"bad records {sum(bad.values()):,}/{read:,} ({reasons})"

  def check(self, max_fraction: float) -> None:
    """BadDataError when more than ``max_fraction`` of the records read are bad."""
    read, bad = self.snapshot()
    total = sum(bad.values())
    if read < MIN_RECORDS or total <= max_fraction * read:
      return
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(bad.items()))
    first = self.examples[max(bad, key=bad.get)]
    raise BadDataError(
      f"{total} of the {read} shard records read are bad ({total / read:.1%}), more than "
      f"data.max_bad_fraction={max_fraction:g}: {reasons} (e.g. {first}). Fix or drop those "
      "shards, or raise data.max_bad_fraction."
    )
