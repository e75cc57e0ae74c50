"""The dynamic batcher and the bucketed batch sizes, on a stand-in for the model."""

import threading
import time

import pytest

from m6_jax.serve.batcher import Batcher, Closed
from m6_jax.serve.service import Batching, bucket_sizes


def test_bucket_sizes():
  assert bucket_sizes(Batching(max_batch=16)) == (1, 2, 4, 8, 16)
  assert bucket_sizes(Batching(max_batch=12)) == (1, 2, 4, 8, 12)
  assert bucket_sizes(Batching(max_batch=16, buckets=(4, 32))) == (4, 16)
  assert bucket_sizes(Batching(max_batch=16), multiple=8) == (8, 16)  # the mesh splits by 8
  assert bucket_sizes(Batching(max_batch=16, buckets=(16,))) == (16,)
  with pytest.raises(ValueError):
    bucket_sizes(Batching(max_batch=0))


def _echo(calls):
  def run(key, payloads):
    calls.append((key, list(payloads)))
    return [f"{key}:{p}" for p in payloads]

  return run


def test_items_of_one_key_share_a_batch_up_to_max_batch():
  calls = []
  batcher = Batcher(_echo(calls), max_batch=3, max_wait_s=0.2)
  futures = [batcher.submit("a", i) for i in range(5)] + [batcher.submit("b", 9)]
  assert [f.result(5) for f in futures] == ["a:0", "a:1", "a:2", "a:3", "a:4", "b:9"]
  assert calls == [("a", [0, 1, 2]), ("a", [3, 4]), ("b", [9])]
  assert batcher.batch_sizes == {3: 1, 2: 1, 1: 1}
  batcher.close()


def test_a_lone_item_waits_at_most_max_wait():
  batcher = Batcher(_echo([]), max_batch=8, max_wait_s=0.05)
  start = time.monotonic()
  assert batcher.submit("k", 1).result(5) == "k:1"
  assert 0.04 <= time.monotonic() - start < 1.0
  batcher.close()


def test_an_error_reaches_its_batch_only_and_the_worker_goes_on():
  def run(key, payloads):
    if key == "bad":
      raise RuntimeError("boom")
    return payloads

  batcher = Batcher(run, max_batch=4, max_wait_s=0.01)
  with pytest.raises(RuntimeError, match="boom"):
    batcher.submit("bad", 1).result(5)
  assert batcher.submit("good", 2).result(5) == 2
  batcher.close()


def test_batches_of_batchers_sharing_a_lock_never_overlap_and_close_drains():
  lock, running, overlaps = threading.Lock(), [], []

  def run(key, payloads):
    running.append(key)
    overlaps.append(len(running) > 1)
    time.sleep(0.01)
    running.remove(key)
    return payloads

  a = Batcher(run, 2, 0.0, lock)
  b = Batcher(run, 2, 0.0, lock)
  futures = [x.submit(k, i) for i in range(6) for x, k in ((a, "a"), (b, "b"))]
  a.close()  # runs what waits before stopping
  b.close()
  assert [f.result(5) for f in futures] == [i for i in range(6) for _ in (0, 1)]
  assert not any(overlaps)
  with pytest.raises(Closed):
    a.submit("a", 1)


def test_a_cancelled_item_is_not_run():
  calls = []
  gate = threading.Event()

  def run(key, payloads):
    gate.wait(5)
    calls.append(list(payloads))
    return payloads

  batcher = Batcher(run, max_batch=1, max_wait_s=0.0)
  first = batcher.submit("k", 1)  # holds the worker until the gate opens
  time.sleep(0.05)
  second = batcher.submit("k", 2)
  assert second.cancel()
  gate.set()
  assert first.result(5) == 1
  batcher.close()
  assert calls == [[1]]


def test_concurrent_workers_run_batches_at_once_up_to_the_semaphore():
  slots = threading.Semaphore(2)
  both_running = threading.Barrier(2, timeout=5)  # broken (an error) unless 2 run at once
  running, most = [], []

  def run(key, payloads):
    running.append(key)
    most.append(len(running))
    both_running.wait()
    time.sleep(0.02)
    running.remove(key)
    return [p * 10 for p in payloads]

  a = Batcher(run, 1, 0.0, slots, workers=2)  # a third worker would find no slot
  b = Batcher(run, 1, 0.0, slots, workers=2)
  futures = [x.submit(k, i) for i in range(4) for x, k in ((a, "a"), (b, "b"))]
  assert [f.result(5) for f in futures] == [i * 10 for i in range(4) for _ in (0, 1)]
  assert max(most) == 2 and sum(a.batch_sizes.values()) == sum(b.batch_sizes.values()) == 4
  a.close()
  b.close()
  with pytest.raises(ValueError, match="workers >= 1"):
    Batcher(run, 1, 0.0, workers=0)
