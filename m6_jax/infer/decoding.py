"""Autoregressive decoding: greedy, beam search and temperature / top-k / top-p sampling.

The searches are written against a generic step function

    step_fn(token [B] int32, position int32 scalar, state) -> (logits [B, vocab], state)

where `state` is any pytree whose leaves all have the batch as their leading dimension (beam
search copies it per beam and reorders it when beams are pruned). `position` is the target
position (0 is the BOS slot), the same for all rows. M6 decodes through one table of
strategies (`STRATEGIES`: greedy, beam, sample, the uncached reference, and the preset
ofa_caption, ModelScope's OFA captioning) and one jitted entry point (`decode`): a new
strategy is one table entry. The cached ones encode the prefix once with `M6.encode_prefix`
and close over it: their state is only the target part of the KV cache, so beams of one
example share one copy of the prefix cache and beam search gathers only the target cache.

`allowed` (bool [vocab], default all) masks the tokens a search may choose: generation passes
the tokenizer's text pieces and EOS, so a caption, an answer or a continuation never holds a
sentinel, <mask>, <unk> or an embedding row beyond the tokenizer's pieces (ofa_caption
excepted: it decodes over every token, as ModelScope does), and for a text in one language
only that language's pieces and those of no script (m6_jax/infer/generate.py's `language`).

All outputs hold the generated tokens without BOS: [.., max_len] int32, EOS included, and
padding (id 0) after EOS. Everything runs inside one `jax.jit` with a `lax.while_loop` that
stops as soon as every row (every example, for beam search) is finished; bos_id, eos_id and
a strategy's traced options (length_penalty, the sampling key) are traced (no recompile per
value), max_len and its static options (beam_size, no_repeat_ngram_size, temperature, top_k,
top_p; a preset's options) are static.
Under a mesh, the caches and decoding buffers carry "batch" logical constraints, so they
stay sharded over the batch like the model's activations.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from m6_jax.model.m6 import M6, PAD_ID, DecodeCache

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]

PREFIX_KEYS = ("image", "has_image", "src_tokens")
NEG_INF = float("-inf")


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, names)


def _check_max_len(model: M6, max_len: int) -> None:
  tgt_len = model.config.tgt_len
  if not 1 <= max_len <= tgt_len:
    raise ValueError(
      f"max_len={max_len} must be in [1, tgt_len={tgt_len}]: the model has target "
      "positions (BOS + max_len - 1 fed tokens) for at most tgt_len steps; raise "
      "data.tgt_len or lower max_len."
    )


# --------------------------------------------------------------------------------------
# Generic searches over a step function
# --------------------------------------------------------------------------------------


def _token_loop(
  step_fn: StepFn,
  state: Any,
  batch_size: int,
  max_len: int,
  bos_id: int,
  eos_id: int,
  choose: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
  """One token per row per step, chosen by `choose(logits [B, V] f32, t)`; [B, max_len]."""

  def cond(carry):
    t, _, _, _, finished = carry
    return (t < max_len) & ~jnp.all(finished)

  def body(carry):
    t, token, state, out, finished = carry
    logits, state = step_fn(token, t, state)
    new = choose(logits.astype(jnp.float32), t).astype(jnp.int32)
    new = jnp.where(finished, PAD_ID, new)
    out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], t, axis=1)
    out = _constrain(out, ("batch", "length"))
    return t + 1, new, state, out, finished | (new == eos_id)

  carry = (
    jnp.zeros((), jnp.int32),
    jnp.full((batch_size,), bos_id, jnp.int32),
    state,
    _constrain(jnp.zeros((batch_size, max_len), jnp.int32), ("batch", "length")),
    jnp.zeros((batch_size,), bool),
  )
  return jax.lax.while_loop(cond, body, carry)[3]


def generic_greedy(
  step_fn: StepFn, state: Any, *, batch_size: int, max_len: int, bos_id: int, eos_id: int
) -> jax.Array:
  """Greedy decoding: tokens [batch_size, max_len], padding after EOS."""
  return _token_loop(
    step_fn, state, batch_size, max_len, bos_id, eos_id, lambda logits, t: jnp.argmax(logits, -1)
  )


def filter_logits(
  logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
  """Temperature, then top-k (0: off), then top-p / nucleus (1.0: off) on [B, V] logits.

  Filtered-out tokens get -inf. Top-p keeps the smallest set of most likely tokens whose
  probability reaches top_p (always at least the most likely token).
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 here, got {temperature}")
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # the first token always: its mass_before is 0
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


def generic_sample(
  step_fn: StepFn,
  state: Any,
  rng: jax.Array,
  *,
  batch_size: int,
  max_len: int,
  bos_id: int,
  eos_id: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> jax.Array:
  """Ancestral sampling; temperature 0 = greedy.

  `rng` is one key (uint32 [2]): step t draws the whole batch with `fold_in(rng, t)`; or
  one key per row ([batch_size, 2]): row i draws with `fold_in(rng[i], t)`, so its tokens
  depend on its own key and inputs only, not on the batch it is decoded in.
  """
  if temperature == 0:
    return generic_greedy(
      step_fn, state, batch_size=batch_size, max_len=max_len, bos_id=bos_id, eos_id=eos_id
    )
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")

  def choose(logits, t):
    return categorical(rng, t, filter_logits(logits, temperature, top_k, top_p))

  return _token_loop(step_fn, state, batch_size, max_len, bos_id, eos_id, choose)


def categorical(rng: jax.Array, t: jax.Array, logits: jax.Array) -> jax.Array:
  """One token per row of logits [B, V] at step t: with one key (uint32 [2]) drawn with
  `fold_in(rng, t)`; with one key per row ([B, 2]), row i with `fold_in(rng[i], t)`."""
  if rng.ndim == 1:
    return jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)
  keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, t)
  return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, logits)


def length_penalty_factor(length: jax.Array, alpha: float, scoring: str = "gnmt") -> jax.Array:
  """What a finished hypothesis's log-prob is divided by: GNMT's ((5 + length) / 6) ** alpha,
  or fairseq's length ** alpha (scoring="fairseq")."""
  length = jnp.asarray(length, jnp.float32)
  return length**alpha if scoring == "fairseq" else ((5.0 + length) / 6.0) ** alpha


def banned_ngrams(seqs: jax.Array, t: jax.Array, bos_id: int, n: int, vocab_size: int) -> jax.Array:
  """bool [R, vocab]: the tokens that would repeat an n-gram of a row, as fairseq's
  NGramRepeatBlock bans them. `seqs` [R, L]: the tokens generated so far (positions < t);
  a row's history is BOS then them, and token x is banned at step t when the history's last
  n - 1 tokens followed by x already occur in it."""
  rows, length = seqs.shape
  hist = jnp.concatenate([jnp.full((rows, 1), bos_id, seqs.dtype), seqs], axis=1)
  last = jax.lax.dynamic_slice_in_dim(hist, jnp.maximum(t - n + 2, 0), n - 1, axis=1)
  starts = jnp.arange(length + 2 - n)
  windows = hist[:, starts[:, None] + jnp.arange(n)[None, :]]  # [R, W, n]
  match = jnp.all(windows[:, :, :-1] == last[:, None, :], axis=-1)
  match &= (starts + n - 1 <= t)[None, :]  # windows within the history
  banned = jnp.zeros((rows, vocab_size), bool)
  return banned.at[jnp.arange(rows)[:, None], windows[:, :, -1]].max(match)


def _gather_beams(tree: Any, parent: jax.Array, batch_size: int, beam_size: int) -> Any:
  """Reorders leaves [b * k, ...] by parent beam [b, k]; indices stay within each example,
  so a batch-sharded leading dimension needs no communication."""

  def gather(x):
    x = x.reshape((batch_size, beam_size) + x.shape[1:])
    idx = parent.reshape(parent.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1).reshape((batch_size * beam_size,) + x.shape[2:])

  return jax.tree.map(gather, tree)


def generic_beam_search(
  step_fn: StepFn,
  state: Any,
  *,
  batch_size: int,
  beam_size: int,
  max_len: int,
  bos_id: int,
  eos_id: int,
  length_penalty: float = 0.6,
  no_repeat_ngram_size: int = 0,
  min_len: int = 0,
  scoring: str = "gnmt",
) -> tuple[jax.Array, jax.Array]:
  """Beam search: (sequences [b, k, max_len], scores [b, k] float32), best first.

  `state` has batch_size rows; it is repeated to batch_size * beam_size rows, beams of one
  example adjacent (row i * k + j is beam j of example i), as step_fn sees them.

  Scheme (as fairseq): each step ranks the 2k best extensions of the k alive beams. EOS
  extensions ranked within the top k are finished: they enter the example's finished set
  with score log-prob / ((5 + len) / 6) ** alpha, len counting EOS. The k best non-EOS
  extensions stay alive. An example is done once k hypotheses have finished; the loop stops
  when all are. At max_len the alive beams of examples not yet done compete (unfinished,
  scored with len = max_len) for the remaining places. With k = 1 this is exactly greedy.

  `no_repeat_ngram_size` n > 0: no beam repeats an n-gram (`banned_ngrams`). `min_len`: EOS
  is barred before step min_len. `scoring="fairseq"` is fairseq's SequenceGenerator (what
  OFA's and ModelScope's captioning run): the step function's logits normalized over every
  token (the allowed mask, if any, taken before; pass none to decode as fairseq does) with
  PAD barred, scores divided by length ** length_penalty, and the last step (max_len - 1)
  ending every beam with EOS, so that max_len counts the EOS fairseq appends after max_len_b
  tokens.
  """
  b, k = batch_size, beam_size
  if k < 1:
    raise ValueError(f"beam_size must be >= 1, got {k}")
  if scoring not in ("gnmt", "fairseq"):
    raise ValueError(f"scoring must be 'gnmt' or 'fairseq', got {scoring!r}")
  state = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), state)
  beam_axes = ("batch", None, "length")

  def cond(carry):
    return (carry["t"] < max_len) & ~jnp.all(carry["finished_count"] >= k)

  def body(c):
    t = c["t"]
    logits, state = step_fn(c["tokens"].reshape(b * k), t, c["state"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = logp.shape[-1]
    token_ids = jnp.arange(vocab)[None, :]
    barred = (t < min_len) & (token_ids == eos_id)
    if scoring == "fairseq":
      barred |= token_ids == PAD_ID
      barred |= (t == max_len - 1) & (token_ids != eos_id)
    if no_repeat_ngram_size > 0:
      history = c["alive_seqs"].reshape(b * k, max_len)
      barred = barred | banned_ngrams(history, t, bos_id, no_repeat_ngram_size, vocab)
    logp = jnp.where(barred, NEG_INF, logp)
    candidates = (c["alive_logp"][:, :, None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
    top_logp, top_idx = jax.lax.top_k(candidates, min(2 * k, k * vocab))
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(c["alive_seqs"], parent[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], t, axis=2)
    is_eos = token == eos_id

    # Finish EOS extensions ranked within the top k, for examples not done yet.
    done = c["finished_count"] >= k
    rank = jnp.arange(top_logp.shape[1])
    newly = is_eos & (rank < k)[None] & ~done[:, None] & (top_logp > NEG_INF)
    penalty = length_penalty_factor(t + 1, length_penalty, scoring)
    new_scores = jnp.where(newly, top_logp / penalty, NEG_INF)
    all_scores = jnp.concatenate([c["finished_scores"], new_scores], axis=1)
    all_seqs = jnp.concatenate([c["finished_seqs"], seqs], axis=1)
    finished_scores, fidx = jax.lax.top_k(all_scores, k)
    finished_seqs = jnp.take_along_axis(all_seqs, fidx[:, :, None], axis=1)

    # The k best non-EOS extensions stay alive.
    alive_logp, aidx = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), k)
    alive_parent = jnp.take_along_axis(parent, aidx, axis=1)
    return {
      "t": t + 1,
      "tokens": jnp.take_along_axis(token, aidx, axis=1),
      "state": _gather_beams(state, alive_parent, b, k),
      "alive_seqs": _constrain(jnp.take_along_axis(seqs, aidx[:, :, None], axis=1), beam_axes),
      "alive_logp": alive_logp,
      "finished_seqs": _constrain(finished_seqs, beam_axes),
      "finished_scores": finished_scores,
      "finished_count": c["finished_count"] + newly.sum(axis=1, dtype=jnp.int32),
    }

  seq_zeros = _constrain(jnp.zeros((b, k, max_len), jnp.int32), beam_axes)
  first_beam_only = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)  # all beams start equal
  carry = {
    "t": jnp.zeros((), jnp.int32),
    "tokens": jnp.full((b, k), bos_id, jnp.int32),
    "state": state,
    "alive_seqs": seq_zeros,
    "alive_logp": jnp.broadcast_to(first_beam_only, (b, k)).astype(jnp.float32),
    "finished_seqs": seq_zeros,
    "finished_scores": jnp.full((b, k), NEG_INF, jnp.float32),
    "finished_count": jnp.zeros((b,), jnp.int32),
  }
  c = jax.lax.while_loop(cond, body, carry)

  # Examples still open at max_len: their alive (unfinished) beams compete for the places.
  done = c["finished_count"] >= k
  alive_scores = c["alive_logp"] / length_penalty_factor(max_len, length_penalty, scoring)
  alive_scores = jnp.where(done[:, None], NEG_INF, alive_scores)
  all_scores = jnp.concatenate([c["finished_scores"], alive_scores], axis=1)
  all_seqs = jnp.concatenate([c["finished_seqs"], c["alive_seqs"]], axis=1)
  scores, idx = jax.lax.top_k(all_scores, k)
  return jnp.take_along_axis(all_seqs, idx[:, :, None], axis=1), scores


# --------------------------------------------------------------------------------------
# M6 bindings
# --------------------------------------------------------------------------------------


def m6_step_fn(
  model: M6, params: Any, prefix_cache: DecodeCache, allowed: jax.Array | None = None
) -> StepFn:
  """The step function of M6 with the prefix cache closed over; its state is the target
  KVCache (`prefix_cache.target` for batch rows, or that repeated per beam). `allowed`
  (bool [vocab], None: all) masks the tokens decoding may never choose."""

  def step(token, position, target):
    cache = DecodeCache(prefix_cache.prefix, target)
    logits, cache = model.apply({"params": params}, cache, token, position, method=M6.decode_step)
    return allow_only(logits, allowed), cache.target

  return step


def m6_uncached_step_fn(
  model: M6, params: Any, batch: Mapping[str, jax.Array], allowed: jax.Array | None = None
) -> tuple[StepFn, jax.Array]:
  """(step function, its initial state) of the reference decoder that reruns the full
  `M6.__call__` (teacher forcing on the tokens fed so far) at every step, without a cache;
  its state is tgt_input [b, tgt_len]. For tests of the cached decoders."""

  def step(token, position, tgt_input):
    tgt_input = jax.lax.dynamic_update_slice_in_dim(tgt_input, token[:, None], position, axis=1)
    logits = model.apply({"params": params}, dict(batch, tgt_input=tgt_input))
    logits = jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False)
    return allow_only(logits, allowed), tgt_input

  b = batch["src_tokens"].shape[0]
  return step, jnp.zeros((b, model.config.tgt_len), jnp.int32)


def allow_only(logits: jax.Array, allowed: jax.Array | None) -> jax.Array:
  """Logits [B, vocab] with the tokens not `allowed` (bool [vocab]) at -inf."""
  if allowed is None:
    return logits
  return jnp.where(allowed[None, :], logits.astype(jnp.float32), NEG_INF)


def encode_prefix(model: M6, params: Any, batch: Mapping[str, jax.Array]) -> DecodeCache:
  return model.apply({"params": params}, batch, method=M6.encode_prefix)


def _allowed(model: M6, allowed: Any) -> jax.Array:
  """The decodable tokens as bool [vocab] (None: all of them; vocab: text and image codes)."""
  vocab = model.config.total_vocab_size
  if allowed is None:
    return jnp.ones((vocab,), bool)
  allowed = jnp.asarray(allowed, bool)
  if allowed.shape != (vocab,):
    raise ValueError(f"allowed has shape {allowed.shape}; want ({vocab},)")
  return allowed


def _prefix_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
  missing = [k for k in PREFIX_KEYS if k not in batch]
  if missing:
    raise KeyError(f"batch lacks {missing}; decoding needs the features {PREFIX_KEYS}")
  return {k: batch[k] for k in PREFIX_KEYS}


# --------------------------------------------------------------------------------------
# The strategies: one table, one jitted entry point
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Strategy:
  """How a strategy decodes: a generic search over M6's step function, and its options.

  `search(step_fn, state, *, batch_size, max_len, bos_id, eos_id, **options)` is one of the
  generic searches above; an option left out takes the search's default. `static` options
  shape the program (name -> type; one compilation per value), `traced` ones are passed as
  values (name -> conversion; no compilation per value). `cached`: the KV-cached step
  function, else the uncached reference (`m6_uncached_step_fn`). `best(output)`: the best
  tokens [b, max_len] of the search's output. A preset fixes options (`preset`: name ->
  value, static, not the caller's), may give a length (`max_len`, EOS included) for callers
  that have none, and `every_token` tells callers that restrict the tokens (generation's text
  pieces) to pass no mask: the decoder it reproduces chooses among all of them.
  """

  search: Callable[..., Any]
  static: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
  traced: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
  cached: bool = True
  best: Callable[[Any], jax.Array] = lambda output: output
  preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  max_len: int = 0
  every_token: bool = False

  @property
  def options(self) -> tuple[str, ...]:
    return (*self.static, *self.traced)


STRATEGIES: dict[str, Strategy] = {
  "greedy": Strategy(generic_greedy),
  # The reference that reruns the full model every step, for tests and benchmarks.
  "greedy_uncached": Strategy(generic_greedy, cached=False),
  # -> (sequences [b, beam, max_len], scores [b, beam]), best first.
  "beam": Strategy(
    generic_beam_search,
    static={"beam_size": int, "no_repeat_ngram_size": int},
    traced={"length_penalty": float},
    best=lambda output: output[0][:, 0],
  ),
  # ModelScope's OFA captioning (OfaForAllTasks' SequenceGenerator): beam 5, no repeated
  # trigram, at least one token, max_len_b 16 tokens then EOS, fairseq's scoring over every
  # token, length penalty 1.
  "ofa_caption": Strategy(
    generic_beam_search,
    best=lambda output: output[0][:, 0],
    preset={
      "beam_size": 5,
      "no_repeat_ngram_size": 3,
      "min_len": 1,
      "length_penalty": 1.0,
      "scoring": "fairseq",
    },
    max_len=17,
    every_token=True,
  ),
  # rng: one key, or one per row (see `generic_sample`); temperature 0 is greedy.
  "sample": Strategy(
    generic_sample,
    static={"temperature": float, "top_k": int, "top_p": float},
    traced={"rng": lambda key: key},
  ),
}


def _options(name: str, given: Mapping[str, Any]) -> tuple[tuple, dict]:
  """(static options as sorted (name, value) pairs, traced options), defaults filled in
  from the search's signature, so that leaving an option out or passing its default
  compiles one program."""
  if name not in STRATEGIES:
    raise ValueError(f"unknown decoding strategy '{name}'; one of {sorted(STRATEGIES)}.")
  strategy = STRATEGIES[name]
  unknown = sorted(set(given) - set(strategy.options))
  if unknown:
    raise TypeError(f"decoding '{name}' takes the options {strategy.options}, not {unknown}.")
  parameters = inspect.signature(strategy.search).parameters
  values = {}
  for option in strategy.options:
    value = given.get(option, parameters[option].default)
    if value is inspect.Parameter.empty:
      raise TypeError(f"decoding '{name}' needs the option '{option}'.")
    values[option] = value
  static = [(k, convert(values[k])) for k, convert in strategy.static.items()]
  static = tuple(sorted(static + list(strategy.preset.items())))
  traced = {k: convert(values[k]) for k, convert in strategy.traced.items()}
  return static, traced


@functools.partial(jax.jit, static_argnames=("model", "strategy", "max_len", "static"))
def _decode_jit(
  model, params, batch, bos_id, eos_id, allowed, traced, *, strategy, max_len, static
):
  s = STRATEGIES[strategy]
  if s.cached:
    cache = encode_prefix(model, params, batch)
    step, state = m6_step_fn(model, params, cache, allowed), cache.target
  else:
    step, state = m6_uncached_step_fn(model, params, batch, allowed)
  return s.search(
    step,
    state,
    batch_size=batch["src_tokens"].shape[0],
    max_len=max_len,
    bos_id=bos_id,
    eos_id=eos_id,
    **dict(static),
    **traced,
  )


def decode(
  model: M6,
  params: Any,
  batch: Mapping[str, Any],
  strategy: str,
  max_len: int,
  bos_id: int,
  eos_id: int,
  allowed: Any = None,
  **options: Any,
) -> Any:
  """Decodes `batch` with the strategy `STRATEGIES[strategy]` and its `options` (e.g.
  beam_size=4, length_penalty=0.6 for "beam"; rng=key, top_k=40 for "sample"), in one
  `jax.jit` compiled once per model, shapes, max_len and static options. Returns the
  search's output: tokens [b, max_len] int32, padding after EOS ("beam": sequences and
  scores; the strategy's `best` gives the best tokens). `allowed` (bool [vocab], None: every token) is
  what the decoder may choose."""
  _check_max_len(model, max_len)
  static, traced = _options(strategy, options)
  return _decode_jit(
    model,
    params,
    _prefix_batch(batch),
    bos_id,
    eos_id,
    _allowed(model, allowed),
    traced,
    strategy=strategy,
    max_len=max_len,
    static=static,
  )
