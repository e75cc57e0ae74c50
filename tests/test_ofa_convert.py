"""`--mode=convert --from=ofa`: a tiny random OFA-CN checkpoint folder (written with
ModelScope's code, tests/ofa_utils.py) converted and captioning an image through
`--mode=generate`, as OFA itself captions it; bad input folders end in one `error:` line."""

import functools
import importlib
import importlib.util
import json
import os
import re
import shutil

import numpy as np
import ofa_utils
import pytest
import torch

from m6_jax.checkpoint import checkpoints
from m6_jax.data import images as images_lib
from m6_jax.data import wordpiece
from m6_jax.errors import UserError
from m6_jax.infer import ofa_convert
from m6_jax.model.m6 import M6Config

# Multi-process / end-to-end: left out of the inner loop (pytest -m 'not slow').
pytestmark = pytest.mark.slow

IMAGE_SIZE, PROMPT = ofa_utils.IMAGE_SIZE, ofa_utils.PROMPT
MAX_LEN = 12  # tokens generated (a random model seldom ends its caption)


@pytest.fixture(scope="module")
def ofa_dir(tmp_path_factory):
  """(the OFA model, its checkpoint folder, an image file)."""
  from PIL import Image

  root = tmp_path_factory.mktemp("ofa")
  model, directory = ofa_utils.write_tiny_checkpoint(str(root / "ofa"))
  image = root / "photo.png"
  pixels = np.random.RandomState(1).randint(0, 256, (80, 96, 3), np.uint8)
  Image.fromarray(pixels).save(image)
  return model, directory, str(image)


def _modelscope_detokenizer():
  """The pattern of ModelScope's OFA-CN post-processing (OfaForAllTasks.detokenizer), read
  from its installed source: ofa_for_all_tasks.py imports the speech model, which needs
  fairseq."""
  root = os.path.dirname(importlib.util.find_spec("modelscope").origin)
  with open(os.path.join(root, "models", "multi_modal", "ofa_for_all_tasks.py")) as f:
    return re.compile(re.search(r"pattern_str = '(.+)'", f.read()).group(1))


@functools.cache
def _modelscope_tokenizer(directory):
  ofa_utils.load_modules()
  tokenization = importlib.import_module(f"{ofa_utils.PACKAGE}.tokenization_ofa")
  return tokenization.OFATokenizerZH(os.path.join(directory, "vocab.txt"))


def _modelscope_text(directory, ofa_ids, clean_up: bool = True) -> str:
  """OFA ids as ModelScope's captioning pipeline makes them text: OFATokenizerZH's
  batch_decode (special tokens skipped), stripped, then its Chinese detokenizer.
  `clean_up`: the clean_up_tokenization_spaces its transformers applies (True before 4.45)."""
  text = _modelscope_tokenizer(directory).batch_decode(
    [list(map(int, ofa_ids))], skip_special_tokens=True, clean_up_tokenization_spaces=clean_up
  )[0]
  return _modelscope_detokenizer().sub("", text.strip())


def _ofa_greedy_caption(model, out_dir, image_path) -> str:
  """What OFA's own model generates greedily for the image and the prompt, made text as
  ModelScope's pipeline makes it: the tokens m6-jax may generate (no special or unused
  rows) only."""
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
    for _ in range(MAX_LEN):
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
  return _modelscope_text(os.path.dirname(image_path) + "/ofa", tokens[0, 1:].numpy())


@pytest.fixture(scope="module")
def converted(ofa_dir, tmp_path_factory):
  """The converted folder (in-process `--mode=convert`) and the conversion's summary."""
  out = str(tmp_path_factory.mktemp("converted") / "ofa_m6")
  return out, ofa_convert.convert(ofa_dir[1], out)


def test_convert_then_caption_like_ofa(ofa_dir, converted, tmp_path, run_main):
  model, _, image = ofa_dir
  out, summary = converted
  assert summary["config"].model.position_bias == "ofa"
  assert os.path.isfile(os.path.join(out, checkpoints.WORDPIECE_FILE))
  jsonl = tmp_path / "captions.jsonl"
  proc = run_main(
    "--mode=generate",
    f"--workdir={out}",
    f"--image={image}",
    f"--output={jsonl}",
    f"--max_len={MAX_LEN}",
    "--language=any",  # OFA decodes without the one-language rule (the random model mixes)
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(jsonl.read_text(encoding="utf-8").splitlines()[-1])
  assert row["task"] == "image_to_text" and row["output"]
  assert row["output"] == _ofa_greedy_caption(model, out, image)


def _convert_cli(args, run_main) -> str:
  """`python -m m6_jax.main --mode=convert --from=ofa ARGS`: its one stderr line."""
  out = run_main("--nohuge_pages", "--mode=convert", "--from=ofa", *args)
  err = out.stderr.strip()
  assert out.returncode == 2 and err.startswith("error: ") and "\n" not in err, err
  return err


def _convert_error(source: str, output: str) -> str:
  """The one-line UserError the converter raises for `source` (in this process: the CLI
  turns it into the `error:` line, as `_convert_cli` checks)."""
  with pytest.raises(UserError) as error:
    ofa_convert.convert(source, output)
  assert "\n" not in str(error.value), error.value
  return str(error.value)


def _copy(directory, target, skip=()):
  """A copy of the checkpoint folder (the weights linked, not copied) without `skip`."""
  os.makedirs(target)
  for name in os.listdir(directory):
    if name not in skip:
      src, dst = os.path.join(directory, name), os.path.join(target, name)
      os.symlink(src, dst) if name.endswith(".bin") else shutil.copyfile(src, dst)
  return str(target)


def test_bad_inputs_are_one_error_line(ofa_dir, tmp_path, run_main):
  _, directory, image = ofa_dir
  out = str(tmp_path / "out")
  err = _convert_cli([f"--input={os.path.dirname(image)}", f"--output={out}"], run_main)
  assert "is not an OFA checkpoint" in err and "pytorch_model.bin" in err
  no_vocab = _copy(directory, tmp_path / "no_vocab", skip=("vocab.txt",))
  assert "has no vocab.txt" in _convert_error(no_vocab, out)
  wrong = _copy(directory, tmp_path / "wrong_shapes", skip=("config.json",))
  with open(os.path.join(directory, "config.json")) as f:
    cfg = json.load(f)
  cfg["encoder_ffn_dim"] = cfg["decoder_ffn_dim"] = 48  # the weights have 64
  with open(os.path.join(wrong, "config.json"), "w") as f:
    json.dump(cfg, f)
  err = _convert_error(wrong, out)
  assert "mlp" in err and "(64,)" in err and "config.json gives (48,)" in err
  assert "--input" in _convert_cli([f"--output={out}"], run_main)  # no --input at all
  assert not os.path.exists(out)


def test_init_from_and_captioning_task_read_the_converted_model(ofa_dir, converted, tmp_path):
  """configs/finetune_ofa.py on the converted folder: its parameters load as init_from loads
  them (shapes and the tokenizer's fingerprint checked) and the captioning task feeds the
  prompt as OFA does (<s> prompt </s>)."""
  import importlib.util

  import flax.linen as nn
  import jax

  from m6_jax import config as config_lib
  from m6_jax.data import pipeline, synthetic, tasks
  from m6_jax.data import tokenizer as tokenizer_lib
  from m6_jax.model.m6 import M6, M6Config, dummy_batch

  out, _ = converted
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "finetune_ofa.py")
  spec = importlib.util.spec_from_file_location("finetune_ofa", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"{out},runlocal")
  config_lib.validate(config, 1)
  tok = tokenizer_lib.get_or_train_tokenizer(
    str(tmp_path), config.model.vocab_size, 0, 1, model_path=config.data.tokenizer_path
  )
  model = M6(M6Config.from_config(config))
  target = nn.unbox(
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_batch(model.config)))
  )["params"]
  loaded = checkpoints.load_params(config.init_from, target, None, tok, config.data.tokenizer_path)
  perm = ofa_convert.special_order(ofa_utils.TINY_CONFIG, ofa_utils.tiny_vocab())
  expected = ofa_dir[0].state_dict()["encoder.embed_tokens.weight"].numpy()[perm]
  np.testing.assert_array_equal(np.asarray(loaded.params["token_embedding"]["embedding"]), expected)
  example = synthetic.make_example(0, 0, config.data.image_size)
  features = tasks.image_to_text(
    example, tok, np.random.default_rng(0), pipeline.task_config(config.data)
  )
  prompt = [tok.bos_id, *tok.encode(PROMPT), tok.eos_id]
  assert features["src_tokens"][: len(prompt)].tolist() == prompt
  assert tok.decode(tok.encode(PROMPT)) == PROMPT


def test_wordpiece_tokenizes_as_ofa_cn(ofa_dir, converted):
  """The converted vocabulary through HF `tokenizers` gives OFA-CN's tokenizer's pieces
  (ModelScope's OFATokenizerZH on the original vocab.txt), ids mapped by the permutation."""
  import importlib

  ofa_utils.load_modules()
  tokenization = importlib.import_module(f"{ofa_utils.PACKAGE}.tokenization_ofa")
  theirs = tokenization.OFATokenizerZH(os.path.join(ofa_dir[1], "vocab.txt"))
  ours = wordpiece.WordPieceTokenizer.from_file(
    os.path.join(converted[0], checkpoints.WORDPIECE_FILE)
  )
  perm = np.asarray(ofa_convert.special_order(ofa_utils.TINY_CONFIG, ofa_utils.tiny_vocab()))
  for text in [
    PROMPT,
    "A Red cat, cats! 猫在草地上",
    "Café ümlaut 狗",
    "  多  空格 ",
    "x<mask>y 你",
  ]:
    expected = theirs(text, add_special_tokens=False)["input_ids"]
    assert perm[ours.encode(text)].tolist() == expected, text
  assert ours.decode(ours.encode("一只猫在草地上")) == "一只猫在草地上"
  # Lines split as a text-mode file splits them (transformers' load_vocab), not at U+2028.
  assert wordpiece.read_vocab(os.path.join(ofa_dir[1], "vocab.txt")) == ofa_utils.tiny_vocab()
  assert wordpiece._pieces("a\r\nb\rc\u2028d\n".encode()) == ["a", "b", "c\u2028d"]


def _folder_with(directory, target, write_weights):
  """`target`: the checkpoint folder's config.json, vocab.txt and configuration.json, and the
  weights as `write_weights(target)` writes them."""
  os.makedirs(target)
  for name in ("config.json", "vocab.txt", "configuration.json"):
    shutil.copyfile(os.path.join(directory, name), os.path.join(target, name))
  write_weights(str(target))
  return str(target)


def test_weights_as_users_have_them(ofa_dir, tmp_path):
  """model.safetensors (safetensors' save_model: the tensor the encoder and decoder share is
  stored once, under the decoder's name), save_pretrained's shards with their index, and a
  ModelScope trainer's epoch_N.pth ({"meta", "state_dict"}, names under "model.") convert to
  the parameters pytorch_model.bin converts to."""
  from safetensors.torch import save_model

  model, directory, _ = ofa_dir
  perm = ofa_convert.special_order(ofa_utils.TINY_CONFIG, ofa_utils.tiny_vocab())
  config = ofa_convert.m6_config(ofa_utils.TINY_CONFIG, {"patch_image_size": IMAGE_SIZE})
  c = M6Config.from_config(config)

  def params(weights):
    return ofa_convert.convert_params(ofa_convert.load_state_dict(weights), c, perm)

  expected = ofa_convert._flat(params(os.path.join(directory, "pytorch_model.bin")))
  state = model.state_dict()
  trainer = {"meta": {"modelscope": "1.4.2", "epoch": 3}, "state_dict": {}}
  trainer["state_dict"] = {f"model.{k}": v for k, v in state.items()}
  writers = {
    "safetensors": lambda d: save_model(model, os.path.join(d, "model.safetensors")),
    "shards": lambda d: model.save_pretrained(d, max_shard_size="1MB", safe_serialization=False),
    "trainer": lambda d: (
      torch.save(trainer, os.path.join(d, "epoch_3.pth")),
      torch.save({"meta": {}, "optimizer": {}}, os.path.join(d, "epoch_3_trainer_state.pth")),
    ),
  }
  for name, write in writers.items():
    folder = _folder_with(directory, tmp_path / name, write)
    got = ofa_convert._flat(params(ofa_convert.find_weights(folder)[1]))
    assert sorted(got) == sorted(expected), name
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{name}: {key}")
  assert len([n for n in os.listdir(tmp_path / "shards") if n.endswith(".bin")]) > 2
  # Several trainer checkpoints: the folder is ambiguous, a file in it is not.
  torch.save(trainer, tmp_path / "trainer" / "epoch_4.pth")
  err = _convert_error(str(tmp_path / "trainer"), str(tmp_path / "o"))
  assert "epoch_3.pth, epoch_4.pth" in err and "epoch_4.pth" in err.split("--input=")[-1]
  assert ofa_convert.find_weights(str(tmp_path / "trainer" / "epoch_3.pth"))[1].endswith(
    "epoch_3.pth"
  )


def test_text_is_joined_as_modelscope_joins_it(ofa_dir, converted):
  """Decoded text equals ModelScope's pipeline's on the same ids (random rows of text pieces,
  and punctuation, contractions and digits between Chinese), with BERT's clean-up of spaces
  before punctuation (the default: data.clean_up_tokenization_spaces) and without (as
  ModelScope decodes under transformers >= 4.45); generation loads the config's choice."""
  from m6_jax.infer import generate

  directory, out = ofa_dir[1], converted[0]
  perm = np.asarray(ofa_convert.special_order(ofa_utils.TINY_CONFIG, ofa_utils.tiny_vocab()))
  vocab = os.path.join(out, checkpoints.WORDPIECE_FILE)
  default = wordpiece.WordPieceTokenizer.from_file(vocab)
  texts = ["果现1, 1里", "a - b (猫) 's do n't, 一只猫。 red cats!", "1 % ， 。 ' ?"]
  rows = [default.encode(t) for t in texts]
  text_ids = np.flatnonzero(default.text_token_mask(len(perm)))
  text_ids = text_ids[text_ids != default.eos_id]
  rng = np.random.default_rng(0)
  rows += [rng.choice(text_ids, rng.integers(1, 12)) for _ in range(200)]
  for row in rows:
    assert default.decode(row) == _modelscope_text(directory, perm[row]), row
  assert default.decode(rows[0]) == "果现1, 1里"
  spaced = wordpiece.WordPieceTokenizer.from_file(vocab, clean_up_spaces=False)
  for row in rows:
    assert spaced.decode(row) == _modelscope_text(directory, perm[row], False), row
  assert spaced.decode(rows[0]) == "果现1 , 1里"
  config = generate.workdir_config(out)
  assert config.data.clean_up_tokenization_spaces
  config.data.clean_up_tokenization_spaces = False
  assert not generate.load_model(out, config=config).tokenizer.clean_up_spaces


def test_ofa_caption_is_modelscopes_caption(ofa_dir, converted, tmp_path):
  """--decoding=ofa_caption captions as ModelScope's captioning does: its SequenceGenerator
  with OfaForAllTasks' settings (beam 5, max_len_b 16, min_len 1, no_repeat_ngram_size 3) on
  the same pixels and prompt, made text by its post-processing. Without the trigram blocking
  its captions differ: the blocking is exercised."""
  from PIL import Image

  from m6_jax.infer import generate

  model, directory, image = ofa_dir
  second = tmp_path / "second.png"
  Image.fromarray(np.random.RandomState(2).randint(0, 256, (64, 64, 3), np.uint8)).save(second)
  paths = [image, str(second)]
  loaded = generate.load_model(converted[0])
  rows = generate.generate(loaded, images=paths, decoding_method="ofa_caption")

  tokenization = importlib.import_module(f"{ofa_utils.PACKAGE}.tokenization_ofa")
  generator = ofa_utils.load_sequence_generator()
  settings = dict(beam_size=5, max_len_b=16, min_len=1)
  perm = np.asarray(ofa_convert.special_order(ofa_utils.TINY_CONFIG, ofa_utils.tiny_vocab()))
  pixels = np.stack([images_lib.load_image_file(p, IMAGE_SIZE) for p in paths]) / 255.0
  src = torch.tensor(perm[loaded.tokenizer.encode_source(PROMPT)])[None].repeat(2, 1)
  sample = {
    "net_input": {
      "input_ids": src,
      "patch_images": torch.tensor(pixels * 2 - 1, dtype=torch.float32).permute(0, 3, 1, 2),
      "patch_masks": torch.tensor([True, True]),
    }
  }

  def modelscope(**blocking):
    tok = tokenization.OFATokenizerZH(os.path.join(directory, "vocab.txt"))
    search = generator.SequenceGenerator(tokenizer=tok, **settings, **blocking)
    return [hypos[0]["tokens"].numpy() for hypos in search.generate([model], sample)]

  expected = modelscope(no_repeat_ngram_size=3)
  assert [len(t) for t in expected] == [17, 17]  # 16 tokens and EOS: max_len_b reached
  assert [r["output"] for r in rows] == [_modelscope_text(directory, t) for t in expected]
  unblocked = modelscope()
  assert any(not np.array_equal(a, b) for a, b in zip(expected, unblocked))
