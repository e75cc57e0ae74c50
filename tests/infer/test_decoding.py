"""KV-cached decoding: equal to teacher forcing, greedy, beam search, sampling, EOS handling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import model_and_batch

from m6_jax.infer import decoding
from m6_jax.model.m6 import M6, dummy_batch
from m6_jax.parallel import partitioning

BOS, EOS = 2, 1


def _pick_eos(model, params, batch, max_len):
  """An EOS id the model really emits: row 0's greedy token at step 3 when nothing stops it.

  Returns (eos_id, greedy tokens without EOS)."""
  free = np.asarray(decoding.decode(model, params, batch, "greedy", max_len, BOS, eos_id=-1))
  return int(free[0, 3]), free


def _step_ends(tokens, eos_id):
  """Length (EOS included) of each generated sequence, max_len when there is no EOS."""
  tokens = np.asarray(tokens)
  is_eos = tokens == eos_id
  return np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, tokens.shape[-1])


# --------------------------------------------------------------------------------------
# The model: cached steps against teacher forcing
# --------------------------------------------------------------------------------------


def test_decode_step_matches_teacher_forcing_at_every_position(tiny_config, random_batch):
  model, params, batch = model_and_batch(tiny_config, random_batch)
  full = np.asarray(jax.jit(model.apply)({"params": params}, batch))
  cache = jax.jit(functools.partial(model.apply, method=M6.encode_prefix))(
    {"params": params}, batch
  )
  # Two rows per example share one prefix row (as the beams of beam search do).
  cache = cache.replace(target=jax.tree.map(lambda x: jnp.repeat(x, 2, 0), cache.target))
  step = jax.jit(
    lambda cache, token, t: model.apply({"params": params}, cache, token, t, method=M6.decode_step)
  )
  lt = model.config.tgt_len
  for t in range(lt):  # padded target positions included: they are fed but not keys
    logits, cache = step(cache, jnp.repeat(batch["tgt_input"][:, t], 2), t)
    logits = np.asarray(logits).reshape(full.shape[0], 2, -1)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0, err_msg=f"t={t}")
    np.testing.assert_array_equal(logits[:, 0], logits[:, 1])
  key = cache.target.layers[0].key
  assert key.shape == (8, lt, model.config.num_heads, model.config.head_dim)
  assert np.abs(np.asarray(key)).min(axis=(2, 3)).max() > 0  # every position was written
  np.testing.assert_array_equal(
    np.asarray(cache.target.valid[::2]), np.asarray(batch["tgt_input"]) != 0
  )


# --------------------------------------------------------------------------------------
# Greedy and EOS
# --------------------------------------------------------------------------------------


def test_greedy_cached_equals_uncached_and_pads_after_eos(tiny_config, random_batch):
  model, params, batch = model_and_batch(tiny_config, random_batch)
  max_len = model.config.tgt_len
  eos, free = _pick_eos(model, params, batch, max_len)
  cached = np.asarray(decoding.decode(model, params, batch, "greedy", max_len, BOS, eos))
  uncached = np.asarray(decoding.decode(model, params, batch, "greedy_uncached", max_len, BOS, eos))
  np.testing.assert_array_equal(cached, uncached)
  # EOS: up to the first EOS the tokens are those of the run without EOS, then padding.
  ends = _step_ends(free, eos)
  assert ends[0] <= 4
  for row, end in enumerate(ends):
    np.testing.assert_array_equal(cached[row, :end], free[row, :end])
    assert (cached[row, end:] == 0).all()
  assert (cached[0, ends[0] - 1]) == eos


def test_max_len_longer_than_the_target_is_refused(tiny_config, random_batch):
  model, params, batch = model_and_batch(tiny_config, random_batch)
  try:
    decoding.decode(model, params, batch, "greedy", model.config.tgt_len + 1, BOS, EOS)
  except ValueError as e:
    assert "tgt_len" in str(e)
  else:
    raise AssertionError("max_len > tgt_len was accepted")


# --------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------


def test_beam_size_one_is_greedy(tiny_config, random_batch):
  model, params, batch = model_and_batch(tiny_config, random_batch)
  max_len = model.config.tgt_len
  eos, _ = _pick_eos(model, params, batch, max_len)
  greedy = np.asarray(decoding.decode(model, params, batch, "greedy", max_len, BOS, eos))
  seqs, scores = decoding.decode(model, params, batch, "beam", max_len, BOS, eos, beam_size=1)
  assert seqs.shape == (4, 1, max_len) and scores.shape == (4, 1)
  np.testing.assert_array_equal(np.asarray(seqs)[:, 0], greedy)


def test_beam_scores_are_sorted_and_match_teacher_forcing(tiny_config, random_batch):
  model, params, batch = model_and_batch(tiny_config, random_batch)
  max_len, k, alpha = model.config.tgt_len, 3, 0.6
  eos, _ = _pick_eos(model, params, batch, max_len)
  seqs, scores = decoding.decode(
    model, params, batch, "beam", max_len, BOS, eos, beam_size=k, length_penalty=alpha
  )
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  assert np.isfinite(scores).all()
  assert (np.diff(scores, axis=1) <= 0).all()  # best first
  assert all(len({tuple(s) for s in beams}) == k for beams in seqs)  # distinct hypotheses
  # Rescore every returned hypothesis with the uncached model (teacher forcing).
  b = seqs.shape[0]
  flat = seqs.reshape(b * k, max_len)
  tgt_input = np.concatenate([np.full((b * k, 1), BOS), flat[:, :-1]], axis=1).astype(np.int32)
  rep = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), batch)
  logits = jax.jit(model.apply)({"params": params}, dict(rep, tgt_input=tgt_input))
  logp = jax.nn.log_softmax(logits)
  token_logp = np.take_along_axis(np.asarray(logp), flat[:, :, None], axis=-1)[..., 0]
  ends = _step_ends(flat, eos)
  total = np.where(np.arange(max_len)[None] < ends[:, None], token_logp, 0).sum(-1)
  expected = total / ((5.0 + ends) / 6.0) ** alpha
  np.testing.assert_allclose(scores.reshape(-1), expected, atol=1e-4, rtol=0)
  for s, end in zip(flat, ends):  # padding after EOS
    assert (s[end:] == 0).all()


# Hand-made first-order "models" over 6 tokens: PAD, EOS, BOS, A, B, C.
A, B, C = 3, 4, 5


def _markov_logp(rows):
  table = np.full((6, 6), 1e-6)
  table[[0, EOS], EOS] = 1.0
  for prev, probs in rows.items():
    for tok, p in probs.items():
      table[prev, tok] = p
  return np.log(table / table.sum(-1, keepdims=True)).astype(np.float32)


# The greedy first token A leads to a flat continuation; B is less likely first but then
# surely ends.
_LOGP = _markov_logp(
  {
    BOS: {A: 0.5, B: 0.4, C: 0.1},
    A: {EOS: 0.3, A: 0.2, B: 0.25, C: 0.25},
    B: {EOS: 0.9, A: 0.1},
    C: {EOS: 1.0},
  }
)


def _fake_step(token, position, history, logp=_LOGP):
  """Logits from the last token; the state is the token history (it must follow the beams)."""
  history = jax.lax.dynamic_update_slice_in_dim(history, token[:, None], position, axis=1)
  return jnp.asarray(logp)[token], history


def _fake_state(batch_size, max_len=5):
  return jnp.zeros((batch_size, max_len), jnp.int32)


def test_beam_search_beats_greedy_on_a_constructed_model():
  kw = dict(batch_size=2, max_len=5, bos_id=BOS, eos_id=EOS)
  greedy = jax.jit(lambda s: decoding.generic_greedy(_fake_step, s, **kw))(_fake_state(2))
  np.testing.assert_array_equal(np.asarray(greedy), [[A, EOS, 0, 0, 0]] * 2)  # p = 0.15

  @jax.jit
  def beam(state):
    return decoding.generic_beam_search(_fake_step, state, beam_size=2, length_penalty=0.0, **kw)

  seqs, scores = beam(_fake_state(2))
  np.testing.assert_array_equal(np.asarray(seqs)[:, 0], [[B, EOS, 0, 0, 0]] * 2)  # p = 0.36
  np.testing.assert_array_equal(np.asarray(seqs)[:, 1], [[A, EOS, 0, 0, 0]] * 2)
  expected = [_LOGP[BOS, B] + _LOGP[B, EOS], _LOGP[BOS, A] + _LOGP[A, EOS]]
  np.testing.assert_allclose(np.asarray(scores), [expected] * 2, atol=1e-6)
  assert expected[0] > expected[1]


def test_length_penalty_can_prefer_the_longer_hypothesis():
  # [B EOS] has p = 0.4, [A C EOS] has p = 0.3: the shorter wins without a penalty, the
  # longer with alpha = 3 (log-probs are divided by ((5 + len) / 6) ** alpha).
  logp = _markov_logp(
    {BOS: {A: 0.6, B: 0.4}, A: {EOS: 0.1, A: 0.4, C: 0.5}, B: {EOS: 1.0}, C: {EOS: 1.0}}
  )
  step = functools.partial(_fake_step, logp=logp)
  kw = dict(batch_size=1, beam_size=2, max_len=4, bos_id=BOS, eos_id=EOS)
  lp = lambda n, alpha: ((5.0 + n) / 6.0) ** alpha
  short, long = [B, EOS, 0, 0], [A, C, EOS, 0]
  short_logp, long_logp = logp[BOS, B] + logp[B, EOS], logp[BOS, A] + logp[A, C] + logp[C, EOS]
  for alpha, order in ((0.0, [short, long]), (3.0, [long, short])):
    seqs, scores = decoding.generic_beam_search(step, _fake_state(1), length_penalty=alpha, **kw)
    np.testing.assert_array_equal(np.asarray(seqs)[0], order)
    want = sorted([short_logp / lp(2, alpha), long_logp / lp(3, alpha)], reverse=True)
    np.testing.assert_allclose(np.asarray(scores)[0], want, atol=1e-6)


def test_unfinished_beams_are_returned_at_max_len():
  # In one step nothing but BOS -> EOS (p ~ 0) can finish: the alive beams come back.
  seqs, scores = decoding.generic_beam_search(
    _fake_step, _fake_state(1), batch_size=1, beam_size=2, max_len=1, bos_id=BOS, eos_id=EOS
  )
  np.testing.assert_array_equal(np.asarray(seqs)[0], [[A], [B]])
  np.testing.assert_allclose(np.asarray(scores)[0], [_LOGP[BOS, A], _LOGP[BOS, B]], atol=1e-6)


def test_banned_ngrams_are_the_repeats_fairseq_bans():
  # History BOS A B A B C A B: after "A B" the trigram blocker bans what followed "A B"
  # before (A, C); after "B C" nothing; the bigram blocker after "B" bans A and C.
  seqs = jnp.asarray([[A, B, A, B, C, A, B, 0]])
  banned = lambda t, n: set(np.flatnonzero(decoding.banned_ngrams(seqs, t, BOS, n, 6)[0]))  # noqa: E731
  assert banned(7, 3) == {A, C}
  assert banned(5, 3) == set()  # last two: B C, never seen before
  assert banned(7, 2) == {A, C}
  assert banned(1, 3) == set() and banned(0, 2) == set()  # no complete n-gram yet


def test_no_repeat_ngrams_and_min_len_in_beam_search():
  # A model that would end at once or say A A A ...: with min_len 1 it cannot end at step 0,
  # and repeating no bigram it says A A once.
  logp = _markov_logp({BOS: {EOS: 0.6, A: 0.4}, A: {A: 0.9, EOS: 0.1}})
  step = functools.partial(_fake_step, logp=logp)
  kw = dict(batch_size=1, beam_size=1, max_len=5, bos_id=BOS, eos_id=EOS, length_penalty=0.0)
  seqs, _ = decoding.generic_beam_search(step, _fake_state(1), **kw)
  np.testing.assert_array_equal(np.asarray(seqs)[0, 0], [EOS, 0, 0, 0, 0])
  seqs, _ = decoding.generic_beam_search(step, _fake_state(1), min_len=1, **kw)
  np.testing.assert_array_equal(np.asarray(seqs)[0, 0], [A, A, A, A, A])
  seqs, _ = decoding.generic_beam_search(
    step, _fake_state(1), min_len=1, no_repeat_ngram_size=2, **kw
  )
  np.testing.assert_array_equal(np.asarray(seqs)[0, 0], [A, A, EOS, 0, 0])


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_top_k_one_is_greedy(tiny_config, random_batch):
  model, params, batch = model_and_batch(tiny_config, random_batch)
  max_len = model.config.tgt_len
  eos, _ = _pick_eos(model, params, batch, max_len)
  key = jax.random.PRNGKey(42)
  a = np.asarray(decoding.decode(model, params, batch, "sample", max_len, BOS, eos, rng=key))
  again = np.asarray(decoding.decode(model, params, batch, "sample", max_len, BOS, eos, rng=key))
  other = np.asarray(
    decoding.decode(model, params, batch, "sample", max_len, BOS, eos, rng=jax.random.PRNGKey(7))
  )
  np.testing.assert_array_equal(a, again)
  assert (a != other).any()
  for end, row in zip(_step_ends(a, eos), a):
    assert (row[end:] == 0).all()
  greedy = np.asarray(decoding.decode(model, params, batch, "greedy", max_len, BOS, eos))
  top1 = decoding.decode(model, params, batch, "sample", max_len, BOS, eos, rng=key, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), greedy)
  cold = decoding.decode(
    model, params, batch, "sample", max_len, BOS, eos, rng=key, temperature=0.0
  )
  np.testing.assert_array_equal(np.asarray(cold), greedy)


def test_filter_logits_top_k_top_p_temperature():
  logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(decoding.filter_logits(logits, top_k=3)) == [True, True, False, True]
  assert kept(decoding.filter_logits(logits, top_p=0.7)) == [False, True, False, True]
  assert kept(decoding.filter_logits(logits, top_p=0.8)) == [False, True, False, True]
  assert kept(decoding.filter_logits(logits, top_p=0.81)) == [True, True, False, True]
  assert kept(decoding.filter_logits(logits, top_p=1e-6)) == [False, True, False, False]
  np.testing.assert_allclose(decoding.filter_logits(logits, temperature=2.0), logits / 2)


def test_sampling_follows_the_filtered_distribution():
  n = 4000

  @functools.partial(jax.jit, static_argnames=("top_k",))
  def run(key, top_k):
    return decoding.generic_sample(
      _fake_step, _fake_state(n), key, batch_size=n, max_len=5, bos_id=BOS, eos_id=EOS, top_k=top_k
    )

  first = np.asarray(run(jax.random.PRNGKey(0), 0))[:, 0]
  np.testing.assert_allclose([(first == t).mean() for t in (A, B, C)], [0.5, 0.4, 0.1], atol=0.03)
  tokens = np.asarray(run(jax.random.PRNGKey(0), 2))
  assert set(tokens[:, 0]) == {A, B}
  np.testing.assert_allclose((tokens[:, 0] == A).mean(), 0.5 / 0.9, atol=0.03)
  # After B the model ends with EOS 90% of the time; after EOS only padding follows.
  ends = _step_ends(tokens, EOS)
  for end, row in zip(ends, tokens):
    assert (row[end:] == 0).all()
  after_b = tokens[tokens[:, 0] == B, 1]
  np.testing.assert_allclose((after_b == EOS).mean(), 0.9, atol=0.03)


# --------------------------------------------------------------------------------------
# Under a mesh
# --------------------------------------------------------------------------------------


@pytest.mark.slow  # multi-device: left out of the inner loop
def test_decoding_on_a_2x2x2_mesh_matches_one_device(tiny_config, random_batch):
  """(The one-device decodes are those of the tests above: the same model, batch and options,
  compiled once; the batch of 4 is one row per (data, fsdp) shard.)"""
  model, params, batch = model_and_batch(tiny_config, random_batch)
  max_len = model.config.tgt_len
  eos, _ = _pick_eos(model, params, batch, max_len)
  greedy = np.asarray(decoding.decode(model, params, batch, "greedy", max_len, BOS, eos))
  seqs, scores = decoding.decode(model, params, batch, "beam", max_len, BOS, eos, beam_size=2)

  tiny_config.mesh.data, tiny_config.mesh.fsdp, tiny_config.mesh.tensor = 2, 2, 2
  mesh = partitioning.make_mesh(tiny_config)
  rules = partitioning.logical_rules(tiny_config)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy_batch(model.config))
  params = jax.device_put(
    params, partitioning.logical_to_shardings(abstract["params"], mesh, rules)
  )
  batch = jax.device_put(batch, partitioning.batch_shardings(batch, mesh, rules))
  with partitioning.mesh_context(mesh, rules):
    cache = jax.jit(functools.partial(model.apply, method=M6.encode_prefix))(
      {"params": params}, batch
    )
    sharded_greedy = decoding.decode(model, params, batch, "greedy", max_len, BOS, eos)
    sharded_seqs, sharded_scores = decoding.decode(
      model, params, batch, "beam", max_len, BOS, eos, beam_size=2
    )
  # The caches follow their logical axes: batch over (data, fsdp), heads over tensor.
  for kv in (cache.prefix.layers[0].key, cache.target.layers[-1].value):
    spec = tuple(kv.sharding.spec) + (None,) * (kv.ndim - len(kv.sharding.spec))
    assert spec == (("data", "fsdp"), None, "tensor", None), spec
  np.testing.assert_array_equal(np.asarray(sharded_greedy), greedy)
  np.testing.assert_array_equal(np.asarray(sharded_seqs), np.asarray(seqs))
  np.testing.assert_allclose(np.asarray(sharded_scores), np.asarray(scores), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# The strategy table
# --------------------------------------------------------------------------------------


def test_one_compilation_per_strategy_shape_and_static_options(tiny_config, random_batch):
  """bos_id, eos_id, length_penalty and the sampling key are traced: new values decode
  without compiling again; a new static option (beam_size, top_k) compiles once, and passing
  an option's default is leaving it out."""
  model, params, batch = model_and_batch(tiny_config, random_batch)
  max_len = 6
  compiled = decoding._decode_jit._cache_size

  def decode(strategy, bos, eos, **options):
    return decoding.decode(model, params, batch, strategy, max_len, bos, eos, **options)

  decode("greedy", BOS, EOS)
  before = compiled()
  decode("greedy", 3, 4)
  decode("beam", BOS, EOS, beam_size=2)
  decode("beam", 3, 4, beam_size=2, length_penalty=1.5)
  decode("sample", BOS, EOS, rng=jax.random.PRNGKey(0))
  decode("sample", 3, 4, rng=jax.random.PRNGKey(1), temperature=1.0, top_k=0, top_p=1.0)
  assert compiled() == before + 2  # beam, sample
  decode("beam", BOS, EOS, beam_size=3)
  decode("sample", BOS, EOS, rng=jax.random.PRNGKey(0), top_k=5)
  assert compiled() == before + 4
  with pytest.raises(
    TypeError,
    match=r"'beam' takes the options \('beam_size', 'no_repeat_ngram_size', 'length_penalty'\)",
  ):
    decode("beam", BOS, EOS, beam_size=2, top_k=3)
  with pytest.raises(TypeError, match="'sample' needs the option 'rng'"):
    decode("sample", BOS, EOS)
  with pytest.raises(ValueError, match="unknown decoding strategy 'nucleus'; one of"):
    decode("nucleus", BOS, EOS)


def test_a_strategy_is_one_table_entry(tiny_config, random_batch, monkeypatch):
  """A new strategy (here: beam search without a length penalty, and no traced option)
  needs nothing but its table entry, which also says where its best tokens are."""
  model, params, batch = model_and_batch(tiny_config, random_batch)
  max_len = model.config.tgt_len
  eos, _ = _pick_eos(model, params, batch, max_len)
  plain_beam = decoding.Strategy(
    functools.partial(decoding.generic_beam_search, length_penalty=0.0),
    static={"beam_size": int},
    best=lambda output: output[0][:, 0],
  )
  monkeypatch.setitem(decoding.STRATEGIES, "plain_beam", plain_beam)
  out = decoding.decode(model, params, batch, "plain_beam", max_len, BOS, eos, beam_size=2)
  seqs, _ = decoding.decode(
    model, params, batch, "beam", max_len, BOS, eos, beam_size=2, length_penalty=0.0
  )
  np.testing.assert_array_equal(np.asarray(plain_beam.best(out)), np.asarray(seqs)[:, 0])
