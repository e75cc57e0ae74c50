"""A small randomly initialised OFA built with ModelScope's PyTorch code (the reference the
converted model is checked against), and its checkpoint directory as OFA ships one.

  python tests/ofa_utils.py /tmp/ofa_tiny   # writes that folder and /tmp/ofa_tiny.png

ModelScope's `modelscope.models.multi_modal.ofa` package cannot be imported as a package: its
__init__ also imports the speech model (modeling_mmspeech.py), which needs fairseq, and
modeling_ofa.py imports vit.py (OFA-Sys's ViT backbones), which needs fairseq too. So the
package's folder is loaded under another name with its own relative imports, and vit.py is
replaced by a stand-in whose backbones raise: a ResNet OFA (use_ofasys=False, every OFA-CN
model) never builds one. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types

PACKAGE = "_modelscope_ofa"

# OFA-CN base's layout in miniature: pre-norm, NormFormer, embedding norms, bucketed relative
# position biases, a ResNet stem (2 bottleneck blocks per stage), exact GELU.
TINY_CONFIG = {
  "vocab_size": 64,
  "d_model": 32,
  "encoder_layers": 2,
  "decoder_layers": 2,
  "encoder_attention_heads": 4,
  "decoder_attention_heads": 4,
  "encoder_ffn_dim": 64,
  "decoder_ffn_dim": 64,
  "max_position_embeddings": 64,
  "resnet_type": "resnet18",
  "token_bucket_size": 16,
  "image_bucket_size": 6,
  "dropout": 0.0,
  "attention_dropout": 0.0,
  "activation_dropout": 0.0,
  "scale_embedding": True,
  # Untied: with a tied head, a random model repeats one token whatever it is fed, which
  # would make the greedy-decoding check blind (OFA-CN ties it; the teacher-forced check
  # covers that form too).
  "share_decoder_input_output_embed": False,
}


def _unavailable(*args, **kwargs):
  raise NotImplementedError("OFA-Sys ViT backbones need fairseq; this reference builds ResNets.")


def load_modules() -> tuple[types.ModuleType, types.ModuleType]:
  """(modeling_ofa, configuration_ofa) from the installed modelscope package."""
  if PACKAGE not in sys.modules:
    spec = importlib.util.find_spec("modelscope")  # locates the package without running it
    root = os.path.join(os.path.dirname(spec.origin), "models", "multi_modal", "ofa")
    package = types.ModuleType(PACKAGE)
    package.__path__ = [root]
    sys.modules[PACKAGE] = package
    vit = types.ModuleType(f"{PACKAGE}.vit")
    for name in ("vit_base", "vit_large", "vit_large_336", "vit_huge"):
      setattr(vit, name, _unavailable)
    sys.modules[f"{PACKAGE}.vit"] = vit
  modeling = importlib.import_module(f"{PACKAGE}.modeling_ofa")
  configuration = importlib.import_module(f"{PACKAGE}.configuration_ofa")
  return modeling, configuration


def load_sequence_generator() -> types.ModuleType:
  """ModelScope's OFA sequence_generator module (the fairseq beam search its pipelines run).
  It imports its siblings by their modelscope names, which would run the package's
  __init__ (fairseq): those names point at the modules loaded here while it is imported."""
  load_modules()
  name = f"{PACKAGE}.generate.sequence_generator"
  if name not in sys.modules:
    real = "modelscope.models.multi_modal.ofa.generate"
    aliases = {real: importlib.import_module(f"{PACKAGE}.generate")}
    for sub in ("search", "ngram_repeat_block"):
      aliases[f"{real}.{sub}"] = importlib.import_module(f"{PACKAGE}.generate.{sub}")
    sys.modules.update(aliases)
    try:
      importlib.import_module(name)
    finally:
      for alias in aliases:
        del sys.modules[alias]
  return sys.modules[name]


def tiny_ofa(seed: int = 0, **overrides):
  """A random OFA model (eval mode) of TINY_CONFIG with `overrides`, and its config dict.

  Every parameter is redrawn (the ResNet's convolutions excepted) so that each one visibly
  moves the logits: OFA initialises its relative position tables to zeros, its norms and
  head scales to ones, and its linear maps small, which would let a wrong relative bias
  or norm pass a 1e-4 check."""
  import torch

  modeling, configuration = load_modules()
  values = {**TINY_CONFIG, **overrides}
  torch.manual_seed(seed)
  model = modeling.OFAModel(configuration.OFAConfig(**values)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "embed_images" in name and p.ndim > 1:
        continue
      if "rel_pos_table" in name:
        p.copy_(torch.randn_like(p) * 0.5)
      elif p.ndim == 2:  # linear maps [out, in] and embedding tables [rows, d]
        p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
      elif name.endswith("bias"):
        p.copy_(torch.randn_like(p) * 0.2)
      else:  # norm scales, head scales
        p.copy_(1 + torch.randn_like(p) * 0.2)
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn_like(b) * 0.1)
      elif name.endswith("running_var"):
        b.copy_(torch.rand_like(b) + 0.5)
  return model, values


def write_checkpoint(model, config: dict, directory: str, vocab: list[str]) -> str:
  """`directory` as an OFA-CN checkpoint folder: pytorch_model.bin, config.json, vocab.txt."""
  import torch

  os.makedirs(directory, exist_ok=True)
  torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"model_type": "ofa", **config}, f)
  with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")
  return directory


def tiny_vocab(rows: int = TINY_CONFIG["vocab_size"]) -> list[str]:
  """An OFA-CN-shaped vocab.txt: OFA's special pieces, then Chinese characters and words."""
  words = ["一", "只", "猫", "狗", "在", "草", "地", "上", "图", "片", "描", "述", "了", "什", "么"]
  words += ["内", "容", "?", "red", "cat", "##s", "cafe", "u", "##mlaut", ",", "!"]
  # What the joining of decoded pieces treats apart: digits, ASCII and full-width punctuation,
  # English contractions.
  words += ["果", "现", "里", "1", "-", "'", "%", "(", ")", "，", "。", "a", "do", "n", "t", "s"]
  pieces = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + words
  return pieces + [f"[unused{i}]" for i in range(rows - len(pieces))]


IMAGE_SIZE = 64  # the tiny model's images: a 4 x 4 patch grid
PROMPT = "图片描述了什么内容?"  # OFA-CN's captioning prompt


def write_tiny_checkpoint(directory: str, seed: int = 0):
  """The tiny OFA (`tiny_ofa(seed)`) as a checkpoint folder, with ModelScope's
  configuration.json (image size, prompt); returns (model, directory)."""
  model, cfg = tiny_ofa(seed)
  write_checkpoint(model, cfg, directory, tiny_vocab())
  pipeline = {"model": {"patch_image_size": IMAGE_SIZE, "prompt": PROMPT, "language": "zh"}}
  with open(os.path.join(directory, "configuration.json"), "w", encoding="utf-8") as f:
    json.dump(pipeline, f, ensure_ascii=False)
  return model, directory


if __name__ == "__main__":
  import numpy as np
  from PIL import Image

  target = os.path.abspath(sys.argv[1])
  write_tiny_checkpoint(target)
  pixels = np.random.RandomState(1).randint(0, 256, (80, 96, 3), np.uint8)
  Image.fromarray(pixels).save(target + ".png")
  print(f"wrote a random OFA-CN-shaped checkpoint to {target} and an image {target}.png")
