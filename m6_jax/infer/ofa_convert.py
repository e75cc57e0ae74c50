"""`--mode=convert --from=ofa`: an OFA / OFA-CN PyTorch checkpoint -> an m6-jax checkpoint.

The input folder is what ModelScope ships for an OFA model, or what users make of one: the
weights (pytorch_model.bin, model.safetensors, a sharded checkpoint's index and shards, or a
.pt / .pth state dict such as a ModelScope trainer's epoch_N.pth, possibly under "model" /
"state_dict"), config.json (OFA's OFAConfig) and vocab.txt (OFA-CN's BERT-style
vocabulary), and optionally configuration.json (ModelScope's pipeline settings: the image
size and the caption prompt).
Parameter names follow ModelScope's modeling_ofa.py. The output is an export-shaped folder
(`checkpoints/0/params`, `config.json`, `tokenizer/vocab.txt`) that --mode=generate, --mode=eval
and config.init_from read like a workdir.

The converted model is the encoder_decoder architecture with OFA's options
(m6_jax/model/ofa.py). Token ids are permuted so that the special ids are m6-jax's (0 <pad>,
1 </s>, 2 <s>, 3 <unk>; OFA's are <s>, <pad>, </s>, <unk>): the embedding rows, the output
head and the written vocabulary are permuted alike. Left out, because captioning and
question answering never read them: OFA's image-generation parameters (the decoder's
image-code positions, norms and relative tables), the key-projection biases (the softmax
cancels them) and the buffers.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from m6_jax import config as config_lib
from m6_jax.checkpoint import checkpoints
from m6_jax.data import wordpiece
from m6_jax.errors import CheckpointError
from m6_jax.model import ofa
from m6_jax.model.m6 import M6, M6Config, dummy_batch

RESNET_LAYERS = {"resnet18": (2, 2, 2), "resnet34": (3, 4, 6), "resnet50": (3, 4, 6)}
RESNET_LAYERS |= {"resnet101": (3, 4, 23), "resnet152": (3, 8, 36)}
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.pt", "model.pt")
INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")  # sharded
TRAINER_STATE_SUFFIX = "_trainer_state.pth"  # ModelScope's optimizer state beside epoch_N.pth
SRC_LEN, TGT_LEN = 64, 32  # the converted position tables' sizes (text maxima)
DEFAULT_IMAGE_SIZE, DEFAULT_PROMPT = 480, " what does the image describe?"  # ModelScope's


def _fail(message: str) -> None:
  raise CheckpointError(message)


def find_weights(path: str) -> tuple[str, str]:
  """(the checkpoint folder, its weights file) for --input: a folder, or a weights file in one.

  A folder's weights are the first of WEIGHT_FILES, else of INDEX_FILES (a sharded
  checkpoint), else its one .pt / .pth state dict (a ModelScope trainer's epoch_N.pth; its
  *_trainer_state.pth holds no weights)."""
  if os.path.isfile(path):
    directory, names = os.path.dirname(os.path.abspath(path)), [os.path.basename(path)]
  elif os.path.isdir(path):
    directory = path
    names = [n for n in WEIGHT_FILES + INDEX_FILES if os.path.isfile(os.path.join(path, n))][:1]
    if not names:
      names = sorted(
        n
        for n in os.listdir(path)
        if n.endswith((".pt", ".pth")) and not n.endswith(TRAINER_STATE_SUFFIX)
      )
      if len(names) > 1:
        _fail(
          f"{path} holds several state dicts ({', '.join(names)}); pass the one to convert "
          f"as --input={os.path.join(path, names[-1])}"
        )
  else:
    _fail(f"--input={path} is neither a directory nor a file; pass an OFA checkpoint folder.")
  if not names or not os.path.isfile(os.path.join(directory, "config.json")):
    _fail(
      f"{directory} is not an OFA checkpoint: it needs config.json, vocab.txt and the weights: "
      "pytorch_model.bin, model.safetensors, a sharded checkpoint's pytorch_model.bin.index.json "
      "or model.safetensors.index.json with its shards, or one .pt / .pth state dict (e.g. a "
      "ModelScope trainer's epoch_N.pth)."
    )
  return directory, os.path.join(directory, names[0])


def read_ofa_config(directory: str) -> tuple[dict, dict]:
  """(config.json, configuration.json's "model" section or {})."""
  with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  if cfg.get("model_type", "ofa") != "ofa" or "encoder_layers" not in cfg:
    _fail(f"{directory}/config.json is not an OFA config (no model_type 'ofa' / encoder_layers).")
  pipeline = {}
  path = os.path.join(directory, "configuration.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      pipeline = json.load(f).get("model", {}) or {}
  return cfg, pipeline


def m6_config(cfg: dict, pipeline: dict) -> ml_collections.ConfigDict:
  """Our config for the OFA config `cfg` (config.json) and ModelScope's `pipeline`."""
  unsupported = {
    "use_ofasys": False,
    "entangle_position_embedding": False,
    "share_attn_bias": False,
    "use_gamma_feature": False,
    "use_image_feature": True,
    "imagenet_default_mean_and_std": False,
  }
  for key, want in unsupported.items():
    if {**cfg, **pipeline}.get(key, want) != want:
      _fail(f"OFA checkpoints with {key}={not want} are not supported (only {key}={want}).")
  for a, b in (
    ("encoder_attention_heads", "decoder_attention_heads"),
    ("encoder_ffn_dim", "decoder_ffn_dim"),
    ("encoder_normalize_before", "decoder_normalize_before"),
    ("layernorm_embedding", "patch_layernorm_embedding"),
  ):
    if cfg.get(a, True) != cfg.get(b, True):
      _fail(f"config.json has {a} != {b}; m6-jax's options use one value for both.")
  if cfg.get("resnet_type", "resnet101") not in RESNET_LAYERS:
    _fail(f"unknown resnet_type {cfg.get('resnet_type')!r}; one of {sorted(RESNET_LAYERS)}.")
  activation = {"gelu": "gelu", "relu": "relu"}.get(cfg.get("activation_function", "gelu"))
  if activation is None:
    _fail(f"activation_function {cfg['activation_function']!r} is not supported (gelu, relu).")
  d, heads = int(cfg["d_model"]), int(cfg["encoder_attention_heads"])
  max_pos = int(cfg.get("max_position_embeddings", 1024))
  c = config_lib.default_config()
  m = c.model
  m.architecture, m.vocab_size, m.d_model, m.num_heads = (
    "encoder_decoder",
    cfg["vocab_size"],
    d,
    heads,
  )
  m.head_dim, m.mlp_dim = d // heads, int(cfg["encoder_ffn_dim"])
  m.num_layers = m.num_encoder_layers = int(cfg["encoder_layers"])
  m.num_decoder_layers = int(cfg["decoder_layers"])
  m.image_stem, m.patch_size, m.layer_norm_epsilon = "ofa_resnet", 16, 1e-5
  m.resnet_layers = RESNET_LAYERS[cfg.get("resnet_type", "resnet101")]
  m.tie_embeddings = bool(cfg.get("share_decoder_input_output_embed", True))
  m.position_bias, m.head_scale, m.activation = "ofa", True, activation
  m.token_bucket_size = int(cfg.get("token_bucket_size", 256))
  m.image_bucket_size = int(cfg.get("image_bucket_size", 42))
  m.attn_scale_factor = float(cfg.get("attn_scale_factor", 2.0))
  m.normformer = bool(cfg.get("normformer", True))
  m.normalize_before = bool(cfg.get("encoder_normalize_before", True))
  m.scale_embedding = bool(cfg.get("scale_embedding", False))
  m.layernorm_embedding = bool(cfg.get("layernorm_embedding", True))
  dt = c.data
  dt.image_size = int(pipeline.get("patch_image_size", DEFAULT_IMAGE_SIZE))
  dt.src_len, dt.tgt_len = min(SRC_LEN, max_pos), min(TGT_LEN, max_pos)
  dt.tokenizer_kind, dt.caption_prompt = "wordpiece", pipeline.get("prompt", DEFAULT_PROMPT)
  return c


def special_order(cfg: dict, vocab: list[str]) -> list[int]:
  """OFA ids in our order: perm[i] is the OFA id of our id i (pad, eos, bos, unk first)."""
  ids = {k: int(cfg.get(f"{k}_token_id", v)) for k, v in (("pad", 1), ("eos", 2), ("bos", 0))}
  for name, piece in (("pad", "<pad>"), ("eos", "</s>"), ("bos", "<s>")):
    if ids[name] >= len(vocab) or vocab[ids[name]] != piece:
      _fail(f"vocab.txt has no {piece} at {name}_token_id={ids[name]} of config.json.")
  if "<unk>" not in vocab:
    _fail("vocab.txt has no <unk> piece; it is not an OFA-CN vocabulary.")
  special = [ids["pad"], ids["eos"], ids["bos"], vocab.index("<unk>")]
  return special + [i for i in range(int(cfg["vocab_size"])) if i not in special]


def full_vocab(vocab: list[str], rows: int) -> list[str]:
  """vocab.txt plus the pieces ModelScope adds at load time (8192 image codes, 1000 bins)."""
  extra = rows - len(vocab)
  if extra < 0:
    _fail(f"vocab.txt has {len(vocab)} pieces but the checkpoint has {rows} embedding rows.")
  if extra == 9192:
    return vocab + [f"<code_{i}>" for i in range(8192)] + [f"<bin_{i}>" for i in range(1000)]
  return vocab + [f"<extra_{i}>" for i in range(extra)]  # rows no piece names


def _read_file(path: str) -> dict:
  """One weights file's tensors: safetensors, or a torch.save'd (state) dict."""
  try:
    if path.endswith(".safetensors"):
      from safetensors.torch import load_file

      return load_file(path)
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
  except ImportError:
    _fail("reading PyTorch weights needs torch: pip install -r requirements-ofa.txt")
  except Exception as e:  # a truncated or foreign file: torch and safetensors say why in many ways
    _fail(f"cannot read {path} as a PyTorch state dict: {str(e).splitlines()[0]}")


def _read_shards(index_path: str) -> dict:
  """A sharded checkpoint's tensors, merged by its index's weight_map (name -> shard file)."""
  try:
    with open(index_path, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    _fail(f"cannot read {index_path} as a sharded checkpoint's index (a weight_map): {e}")
  state, directory = {}, os.path.dirname(index_path)
  for shard in sorted(set(weight_map.values())):
    if not os.path.isfile(os.path.join(directory, shard)):
      _fail(f"{index_path} names the shard {shard}, which is not in {directory}.")
    tensors = _read_file(os.path.join(directory, shard))
    state |= {k: v for k, v in tensors.items() if weight_map.get(k) == shard}
  missing = sorted(set(weight_map) - set(state))
  if missing:
    _fail(f"{missing[0]} is not in {weight_map[missing[0]]}, where {index_path} says it is.")
  return state


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """The weights at `path` (a file, or a sharded checkpoint's index) in modeling_ofa.py's
  names, as float32 numpy arrays: a trainer checkpoint's "model" / "state_dict" unwrapped, a
  leading "model." stripped, and the encoder's token embedding (one tensor with the
  decoder's in OFAModel, which safetensors stores under one name) restored."""
  state = _read_shards(path) if path.endswith(".index.json") else _read_file(path)
  for key in ("model", "state_dict"):
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
  out = {}
  for k, v in state.items():
    if hasattr(v, "numpy"):
      out[re.sub(r"^model\.", "", k)] = v.detach().float().numpy()
  tied = "decoder.embed_tokens.weight"
  if "encoder.embed_tokens.weight" not in out and tied in out:
    out["encoder.embed_tokens.weight"] = out[tied]
  return out


def interpolate_image_positions(sd: dict, cfg: dict, image_size: int) -> dict:
  """`sd` with the image position rows of an `image_size` image as OFA computes them with
  interpolate_position=true (modeling_ofa.py's get_patch_images_info): a patch grid larger
  than orig_patch_image_size's takes that grid's embeddings bilinearly resized (torch's
  F.interpolate, as OFA) instead of its own rows. The image size is fixed at conversion, so
  the resized embeddings are written into the rows the converted model reads."""
  orig, grid = int(cfg.get("orig_patch_image_size", 224)) // 16, image_size // 16
  if not cfg.get("interpolate_position", False) or grid * grid <= orig * orig:
    return sd
  import torch

  bucket = int(cfg.get("image_bucket_size", 42))
  table = sd["encoder.embed_image_positions.weight"]
  old = torch.from_numpy(table[ofa.image_position_ids(bucket, (orig, orig))])
  old = old.reshape(1, orig, orig, -1).permute(0, 3, 1, 2)
  new = torch.nn.functional.interpolate(old, size=(grid, grid), mode="bilinear")
  table = table.copy()
  table[ofa.image_position_ids(bucket, (grid, grid))] = (
    new[0].permute(1, 2, 0).reshape(grid * grid, -1).numpy()
  )
  return sd | {"encoder.embed_image_positions.weight": table}


def _linear(sd, name, heads=None, out=False):
  """torch Linear `name` -> our kernel (and bias): [in, out], or per-head shapes."""
  w = sd[f"{name}.weight"].T
  b = sd.get(f"{name}.bias")
  if heads and out:
    return w.reshape(heads, -1, w.shape[1]), b
  if heads:
    return w.reshape(w.shape[0], heads, -1), None if b is None else b.reshape(heads, -1)
  return w, b


def _norm(sd, name):
  return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def _attention(sd, name, heads, head_scale):
  q, qb = _linear(sd, f"{name}.q_proj", heads)
  k, _ = _linear(sd, f"{name}.k_proj", heads)  # its bias cancels in the softmax
  v, vb = _linear(sd, f"{name}.v_proj", heads)
  o, ob = _linear(sd, f"{name}.out_proj", heads, out=True)
  p = {
    "query": q,
    "query_bias": qb,
    "key": k,
    "value": v,
    "value_bias": vb,
    "out": o,
    "out_bias": ob,
  }
  if head_scale:
    p["head_scale"] = sd[f"{name}.c_attn"]
  return p


def _layer(sd, prefix, c, stack, i):
  o, heads = c.ofa, c.num_heads
  p = {"attention": _attention(sd, f"{prefix}.self_attn", heads, o.head_scale)}
  p["pre_attention_norm"] = _norm(sd, f"{prefix}.self_attn_layer_norm")
  p["pre_mlp_norm"] = _norm(sd, f"{prefix}.final_layer_norm")
  wi, wib = _linear(sd, f"{prefix}.fc1")
  wo, wob = _linear(sd, f"{prefix}.fc2")
  p["mlp"] = {"wi": {"kernel": wi, "bias": wib}, "wo": {"kernel": wo, "bias": wob}}
  if o.normformer:
    p["attention_mid_norm"] = _norm(sd, f"{prefix}.self_attn_mid_layer_norm")
    p["mlp"]["mid_norm"] = _norm(sd, f"{prefix}.ffn_layer_norm")
  if stack == "decoder":
    p["cross_attention"] = _attention(sd, f"{prefix}.cross_attn", heads, o.head_scale)
    p["pre_cross_attention_norm"] = _norm(sd, f"{prefix}.cross_attn_layer_norm")
    if o.normformer:
      p["cross_attention_mid_norm"] = _norm(sd, f"{prefix}.cross_attn_mid_layer_norm")
  p["token_position_bias"] = sd[f"{stack}.token_rel_pos_table_list.{i}.weight"]
  if stack == "encoder":
    p["image_position_bias"] = sd[f"encoder.image_rel_pos_table_list.{i}.weight"]
  return p


def _stem(sd, layers):
  conv = lambda n: sd[f"encoder.embed_images.{n}.weight"].transpose(2, 3, 1, 0)  # noqa: E731

  def bn(n):
    e = f"encoder.embed_images.{n}"
    return {
      "scale": sd[f"{e}.weight"],
      "bias": sd[f"{e}.bias"],
      "mean": sd[f"{e}.running_mean"],
      "var": sd[f"{e}.running_var"],
    }

  p = {"conv1": {"kernel": conv("conv1")}, "bn1": bn("bn1")}
  for s, blocks in enumerate(layers):
    for i in range(blocks):
      n = f"layer{s + 1}.{i}"
      block = {f"conv{j}": {"kernel": conv(f"{n}.conv{j}")} for j in (1, 2, 3)}
      block |= {f"bn{j}": bn(f"{n}.bn{j}") for j in (1, 2, 3)}
      if f"encoder.embed_images.{n}.downsample.0.weight" in sd:
        block["downsample_conv"] = {"kernel": conv(f"{n}.downsample.0")}
        block["downsample_bn"] = bn(f"{n}.downsample.1")
      p[f"layer{s + 1}_{i}"] = block
  w, b = _linear(sd, "encoder.image_proj")
  p["projection"] = {"kernel": w, "bias": b}
  return p


def convert_params(sd: dict, c: M6Config, perm: list[int]) -> dict:
  """OFA's state dict -> our parameter tree (numpy) for the converted config `c`."""
  o, heads = c.ofa, c.num_heads
  emb = sd["encoder.embed_tokens.weight"]
  if emb.shape[0] != len(perm):
    _fail(f"encoder.embed_tokens has {emb.shape[0]} rows; config.json says {len(perm)}.")
  types = sd.get("encoder.type_embedding.weight", np.zeros((2, emb.shape[1]), np.float32))
  p = {
    "token_embedding": {"embedding": emb[perm]},
    "segment_embedding": {"embedding": np.stack([types[1], types[0], np.zeros_like(types[0])])},
    "image_embedding": {"stem": _stem(sd, o.resnet_layers)},
  }
  if not c.tie_embeddings:
    p["lm_head"] = {"kernel": sd["decoder.output_projection.weight"][perm].T}
  if o.normalize_before:
    p["encoder_norm"] = _norm(sd, "encoder.layer_norm")
    p["final_norm"] = _norm(sd, "decoder.layer_norm")
  inputs = {}
  if o.layernorm_embedding:
    inputs["source_norm"] = _norm(sd, "encoder.layernorm_embedding")
    inputs["image_norm"] = _norm(sd, "encoder.patch_layernorm_embedding")
    inputs["target_norm"] = _norm(sd, "decoder.layernorm_embedding")
  table = lambda n, rows=None: {"embedding": sd[f"{n}.weight"][:rows]}  # noqa: E731
  inputs["source_positions"] = table("encoder.embed_positions", c.src_len)
  inputs["image_positions"] = table("encoder.embed_image_positions")
  inputs["target_positions"] = table("decoder.embed_positions", c.tgt_len)
  for ours, theirs in (("source", "encoder.pos_ln"), ("image", "encoder.image_pos_ln")):
    inputs[f"{ours}_position_norm"] = _norm(sd, theirs)
  inputs["target_position_norm"] = _norm(sd, "decoder.pos_ln")
  for ours, theirs in (
    ("encoder_q", "encoder.pos_q_linear"),
    ("encoder_k", "encoder.pos_k_linear"),
    ("self_q", "decoder.self_pos_q_linear"),
    ("self_k", "decoder.self_pos_k_linear"),
    ("cross_q", "decoder.cross_pos_q_linear"),
    ("cross_k", "decoder.cross_pos_k_linear"),
  ):
    kernel, bias = _linear(sd, theirs, heads)
    inputs[ours] = {"kernel": kernel, "bias": bias}
  p["ofa_inputs"] = inputs
  for stack in ("encoder", "decoder"):
    for i in range(c.stack_layers(stack)):
      p[f"{stack}_layer_{i}"] = _layer(sd, f"{stack}.layers.{i}", c, stack, i)
  return p


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
  return {prefix[:-1]: tree}


def check_shapes(params: dict, model: M6) -> None:
  """CheckpointError naming the first parameter whose shape the config does not give."""
  init = lambda: model.init(jax.random.PRNGKey(0), dummy_batch(model.config))  # noqa: E731
  want = {k: tuple(v.shape) for k, v in _flat(nn.unbox(jax.eval_shape(init)["params"])).items()}
  got = {k: tuple(np.shape(v)) for k, v in _flat(params).items()}
  for key in sorted(want):
    if key not in got:
      _fail(f"the checkpoint has no weights for {key}, which its config.json implies.")
    if got[key] != want[key]:
      _fail(
        f"the checkpoint's weights for {key} have shape {got[key]}, but its config.json gives "
        f"{want[key]}; the weights and config.json are of different models."
      )


def convert(input_dir: str, output_dir: str) -> dict[str, Any]:
  """Converts the OFA checkpoint folder `input_dir` into `output_dir`; returns a summary."""
  input_dir, weights = find_weights(input_dir)
  cfg, pipeline = read_ofa_config(input_dir)
  vocab_path = os.path.join(input_dir, "vocab.txt")
  if not os.path.isfile(vocab_path):
    _fail(f"{input_dir} has no vocab.txt: the OFA-CN vocabulary is needed to tokenize.")
  output_dir = os.path.abspath(output_dir)
  if os.path.isdir(checkpoints.checkpoint_dir(output_dir)):
    _fail(f"{output_dir} already holds a checkpoint; pick a new --output.")
  config = m6_config(cfg, pipeline)
  config_lib.validate(config, len(jax.devices()), training=False)
  model = M6(M6Config.from_config(config))
  vocab = wordpiece.read_vocab(vocab_path)
  perm = special_order(cfg, vocab)
  sd = interpolate_image_positions(load_state_dict(weights), cfg, int(config.data.image_size))
  try:
    params = convert_params(sd, model.config, perm)
  except KeyError as e:
    _fail(f"{weights} has no {e.args[0]}: not the weights of the OFA model config.json describes.")
  check_shapes(params, model)
  pieces = full_vocab(vocab, len(perm))
  os.makedirs(os.path.join(output_dir, "tokenizer"), exist_ok=True)
  vocab_out = os.path.join(output_dir, checkpoints.WORDPIECE_FILE)
  with open(vocab_out, "w", encoding="utf-8") as f:
    f.write("\n".join(pieces[i] for i in perm) + "\n")
  tokenizer = wordpiece.WordPieceTokenizer.from_file(vocab_out)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  ckpts = checkpoints.Checkpoints(checkpoints.checkpoint_dir(output_dir), async_save=False)
  ckpts.save(0, config=config, tokenizer=tokenizer, params=params)
  ckpts.wait()
  checkpoints.write_config(output_dir, config)
  n = int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
  return {"num_params": n, "weights": weights, "output": output_dir, "config": config}
