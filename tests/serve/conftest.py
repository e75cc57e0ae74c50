"""One tiny served workdir for the server's tests: a text-to-image model (stand-in VQGAN
codes) that also captions, answers and continues text, so that every endpoint is served.
Its parameters are freshly initialised and exported (no training: what is tested is the
serving, and sampling from untrained weights gives outputs that differ by seed and input)."""

import pytest
from infer.image_codes_stand_in import (
  StandInImageTokenizer,
  write_codes_dir,
)  # tests/ is on sys.path
from PIL import Image

from m6_jax.config import default_config
from m6_jax.data import synthetic

K, GRID = 16, (3, 3)


def _config(tokenizer_path: str, codes_dir: str):
  c = default_config()
  c.model.vocab_size = 512
  c.model.d_model, c.model.num_layers, c.model.mlp_dim = 32, 1, 64
  c.model.num_heads, c.model.head_dim = 2, 16
  c.model.code_vocab_size, c.model.code_grid = K, GRID
  c.data.image_size = 48  # the stand-in VQGAN's (3 x 3 cells of 16 pixels)
  c.data.src_len, c.data.tgt_len = 12, 10  # 9 codes + EOS
  c.data.tokenizer_path = tokenizer_path
  c.data.image_codes_dir = codes_dir
  for name in c.data.task_weights:
    c.data.task_weights[name] = 0.0
  weights = c.data.task_weights
  weights.text_to_image, weights.image_to_text, weights.vqa, weights.text_lm = 1.0, 1.0, 1.0, 0.5
  return c


@pytest.fixture(scope="session")
def served(tmp_path_factory, tokenizer_path):
  """(workdir, the stand-in VQGAN's workdir): an export of the model at step 1."""
  from m6_jax.checkpoint import checkpoints
  from m6_jax.data import tokenizer as tokenizer_lib
  from m6_jax.infer import export, generate

  root = tmp_path_factory.mktemp("served")
  vqgan = StandInImageTokenizer(K, GRID, image_size=48)
  vqgan_dir = vqgan.save(str(root / "vqgan"))
  config = _config(tokenizer_path, write_codes_dir(str(root / "codes"), vqgan, vqgan_dir))
  model = generate.init_model(config, tokenizer_lib.Tokenizer.from_file(tokenizer_path), seed=1)
  workdir = str(root / "m6")
  source = checkpoints.checkpoint_dir(workdir)
  export.export(model.params, 1, source, config, model.tokenizer, tokenizer_path, workdir)
  return workdir, vqgan_dir


@pytest.fixture(scope="session")
def vqgan_loader():
  """What loads the stand-in VQGAN where the real one would be loaded."""
  return lambda workdir, step=None: StandInImageTokenizer.load(workdir, step)


@pytest.fixture(scope="session")
def scene_files(tmp_path_factory):
  """PNG files of 12 validation scenes."""
  root = tmp_path_factory.mktemp("scenes")
  paths = []
  for i in range(12):
    ex = synthetic.make_example(i, synthetic.split_index("validation", i))
    paths.append(str(root / f"scene_{i}.png"))
    Image.fromarray(ex["image"]).save(paths[-1])
  return paths


@pytest.fixture(scope="session")
def service(served, vqgan_loader):
  """The trained model served with the stand-in VQGAN, warmed up; requests sent together
  within 100 ms share a batch."""
  from m6_jax.infer import generate
  from m6_jax.serve.service import Batching, Limits, Service

  workdir, vqgan_dir = served
  svc = Service(
    generate.load_model(workdir),
    vqgan_loader(vqgan_dir),
    Batching(max_batch=16, max_wait_ms=100),
    Limits(max_request_bytes=2**20),
  )
  svc.warmup()
  yield svc
  svc.close()


@pytest.fixture(scope="session")
def app(service):
  from m6_jax.serve.app import create_app

  return create_app(service)
