"""`--mode=convert --from=ofa`: a tiny random OFA-CN checkpoint folder (written with
ModelScope's code, tests/ofa_utils.py) converted and captioning an image through
`--mode=generate`, as OFA itself captions it; bad input folders end in one `error:` line."""

import json
import os
import shutil

import numpy as np
import ofa_utils
import pytest
import torch

from m6_jax import checkpoints
from m6_jax.data import images as images_lib
from m6_jax.data import wordpiece
from m6_jax.infer import ofa_convert

IMAGE_SIZE = 64
PROMPT = "图片描述了什么内容?"  # OFA-CN's captioning prompt


@pytest.fixture(scope="module")
def ofa_dir(tmp_path_factory):
  """(the OFA model, its checkpoint folder, an image file)."""
  from PIL import Image

  root = tmp_path_factory.mktemp("ofa")
  model, cfg = ofa_utils.tiny_ofa()
  directory = ofa_utils.write_checkpoint(model, cfg, str(root / "ofa"), ofa_utils.tiny_vocab())
  with open(os.path.join(directory, "configuration.json"), "w", encoding="utf-8") as f:
    json.dump({"model": {"patch_image_size": IMAGE_SIZE, "prompt": PROMPT, "language": "zh"}}, f)
  image = root / "photo.png"
  pixels = np.random.RandomState(1).randint(0, 256, (80, 96, 3), np.uint8)
  Image.fromarray(pixels).save(image)
  return model, directory, str(image)


def _ofa_greedy_caption(model, out_dir, image_path) -> str:
  """What OFA's own model generates greedily for the image and the prompt, decoded by the
  converted tokenizer: the tokens m6-jax may generate (no special or unused rows) only."""
  tok = wordpiece.WordPieceTokenizer.from_file(os.path.join(out_dir, checkpoints.WORDPIECE_FILE))
  vocab = ofa_utils.tiny_vocab()
  perm = np.asarray(ofa_convert.special_order(ofa_utils.TINY_CONFIG, vocab))  # ours -> OFA id
  allowed = np.zeros(len(perm), bool)
  allowed[perm[tok.text_token_mask(len(perm))]] = True
  pixels = images_lib.load_image_file(image_path, IMAGE_SIZE).astype(np.float32) / 255.0
  image = torch.tensor(pixels * 2 - 1).permute(2, 0, 1)[None]
  src = torch.tensor(perm[tok.encode_source(PROMPT)])[None]
  tokens = torch.zeros((1, 1), dtype=torch.long)  # OFA's <s>
  with torch.no_grad():
    for _ in range(32):  # the converted config's tgt_len
      out = model(
        input_ids=src,
        patch_images=image,
        patch_masks=torch.tensor([True]),
        decoder_input_ids=tokens,
      )
      logits = out.logits[0, -1].numpy()
      nxt = int(np.where(allowed, logits, -np.inf).argmax())
      tokens = torch.cat([tokens, torch.tensor([[nxt]])], 1)
      if nxt == 2:  # OFA's </s>
        break
  return tok.decode(np.argsort(perm)[tokens[0, 1:].numpy()])


def test_convert_then_caption_like_ofa(ofa_dir, tmp_path, run_main):
  model, directory, image = ofa_dir
  out = str(tmp_path / "converted")
  summary = ofa_convert.convert(directory, out)
  assert summary["config"].model.position_bias == "ofa"
  assert os.path.isfile(os.path.join(out, checkpoints.WORDPIECE_FILE))
  jsonl = tmp_path / "captions.jsonl"
  proc = run_main("--mode=generate", f"--workdir={out}", f"--image={image}", f"--output={jsonl}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(jsonl.read_text(encoding="utf-8").splitlines()[-1])
  assert row["task"] == "caption" and row["output"]
  assert row["output"] == _ofa_greedy_caption(model, out, image)


def _convert_cli(args, capsys) -> str:
  """`python -m m6_jax.main --mode=convert ARGS` in this process: its one stderr line."""
  from absl import flags

  from m6_jax import main as main_lib

  flags.FLAGS(["m6_jax.main", "--nohuge_pages", "--mode=convert", "--from=ofa", *args])
  try:
    with pytest.raises(SystemExit) as stop:
      main_lib.main(["m6_jax.main"])
  finally:
    flags.FLAGS.unparse_flags()
  err = capsys.readouterr().err.strip()
  assert stop.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
  return err


def _copy(directory, target, skip=()):
  """A copy of the checkpoint folder (the weights linked, not copied) without `skip`."""
  os.makedirs(target)
  for name in os.listdir(directory):
    if name not in skip:
      src, dst = os.path.join(directory, name), os.path.join(target, name)
      os.symlink(src, dst) if name.endswith(".bin") else shutil.copyfile(src, dst)
  return str(target)


def test_bad_inputs_are_one_error_line(ofa_dir, tmp_path, capsys):
  _, directory, image = ofa_dir
  out = f"--output={tmp_path / 'out'}"
  err = _convert_cli([f"--input={os.path.dirname(image)}", out], capsys)
  assert "is not an OFA checkpoint" in err and "pytorch_model.bin" in err
  no_vocab = _copy(directory, tmp_path / "no_vocab", skip=("vocab.txt",))
  assert "has no vocab.txt" in _convert_cli([f"--input={no_vocab}", out], capsys)
  wrong = _copy(directory, tmp_path / "wrong_shapes", skip=("config.json",))
  with open(os.path.join(directory, "config.json")) as f:
    cfg = json.load(f)
  cfg["encoder_ffn_dim"] = cfg["decoder_ffn_dim"] = 48  # the weights have 64
  with open(os.path.join(wrong, "config.json"), "w") as f:
    json.dump(cfg, f)
  err = _convert_cli([f"--input={wrong}", out], capsys)
  assert "mlp" in err and "(64,)" in err and "config.json gives (48,)" in err
  assert "--input" in _convert_cli([out], capsys)  # no --input at all
  assert not os.path.exists(tmp_path / "out")
