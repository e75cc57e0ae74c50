"""A data iterator's position saved by another number of processes (a resume on more or
fewer hosts): what each process resumes from, and what that keeps.

* Streamed shards (``ShardStreamIterator.adopt_states``): the shards are dealt anew, so every
  process starts its streams afresh in a new order; the bad-record totals carry over.
* A prepared dataset, the synthetic world and the image batches: the global stream does not
  depend on the process count (process p of n takes rows p, p+n, ... of global batch k), so
  every process saved the same position and each global batch goes on with the same records.
"""

from __future__ import annotations

import json


def state_for_process_count(iterator, states: list[dict], index: int, count: int):
  """(the state process ``index`` of ``count`` resumes from, what is kept, in words), from
  ``states``: the saved state of each process of another count, in process order."""
  adopt = getattr(iterator, "adopt_states", None)
  if adopt is not None:
    return adopt(states, index, count)
  positions = {json.dumps(s, sort_keys=True) for s in states}
  note = "every global batch goes on with the records it had (the same global batch size)"
  if len(positions) > 1:  # not written by this project's pipelines; process 0's is taken
    note = f"the processes saved different positions; process 0's is taken ({states[0]})"
  return states[0], note
