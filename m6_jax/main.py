"""Entry point: `python -m m6_jax.main --config=configs/base.py --workdir=/tmp/m6`.

Flags:
  --config     a config file (`configs/<name>.py`, optionally `:variant`); override any value:
               `--config.<key>=<value>`, e.g. `--config.train.steps=50`. params: count them.
  --workdir    where checkpoints, metrics.jsonl, TensorBoard events, the tokenizer and
               config.json go. A workdir holding a checkpoint resumes from it.
  --mode       train: train or resume in --workdir (needs --config, --workdir).
               prepare_data: convert user data (image folder + JSONL, or MUGE TSV) into a
               TFDS array_record dataset under --data_dir/--name (needs the prepare_data
               flags below, no config).
               generate: caption --image(s), answer --question about them, or continue a
               --prompt, from the latest (or --checkpoint_step, or --best) checkpoint of
               --workdir; greedy, beam or sampling (--decoding); prints and appends JSONL.
               A text-to-image model draws a --prompt into --output_dir (infer/text_to_image.py).
               eval: loss/accuracy per task and BLEU-4 / CIDEr / VQA accuracy (a VQGAN: PSNR,
               codebook usage, perplexity) on the validation split; writes
               <workdir>/eval_metrics.json(l) and TensorBoard (--baselines adds baselines).
               encode_images: the VQGAN of --workdir encodes a data source's images (--config,
               default its own) into code grids in --codes_dir, once.
               export: write the parameters of a checkpoint of --workdir (latest,
               --checkpoint_step or --best) with its config and tokenizer into
               --export_dir, without the optimizer state; generate, eval and
               config.init_from read an export like a workdir.
               convert: --from=ofa --input=<OFA-CN PyTorch checkpoint folder>
               --output=<new folder>: an m6-jax checkpoint of it (m6_jax/convert_cli.py).
               generate, eval and export use the checkpoint's config unless --config is
               given; they run on the config's mesh (--config.mesh.*), so a model sharded
               for training is sharded for inference too.

Multi-host (one process per host, every process running the same command; see README.md):
  --distributed          let JAX detect the cluster and join it (Cloud TPU pod slices, SLURM,
                         Open MPI, JAX_COORDINATOR_ADDRESS); nothing else needed on a TPU pod.
  --coordinator_address  host:port of process 0, with --num_processes and --process_id:
                         explicit set-up for other clusters (GPU nodes, CPU processes).
jax.distributed is started before anything else touches JAX, for every mode.

Host memory:
  --huge_pages  (default true; --nohuge_pages: off) on Linux with glibc >= 2.35, restart once
                with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (m6_jax/host_memory.py; base steps
                25% faster on CPU: XLA's large per-step host buffers on transparent huge pages).

Every user mistake (bad flag, unknown config key, impossible mesh, missing file) ends with one
`error: ...` line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from m6_jax import convert_cli
from m6_jax.errors import exit_with, one_line

flags.adopt_module_key_flags(convert_cli)  # --from, --input: listed by --helpshort too
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/base.py (variants: configs/base.py:runlocal).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  "train prepare_data generate eval export convert encode_images params aot".split(),
  "What to run.",
)
# Multi-host runs: jax.distributed (m6_jax/parallel/multihost.py)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Join a multi-process JAX job whose set-up JAX detects (Cloud TPU pod slice, SLURM, Open "
  "MPI, or the JAX_COORDINATOR_ADDRESS environment variable); the flags below, if given, "
  "override what is detected. Run the same command on every host.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-process job without auto-detection: host:port of process 0 (a port free there), the "
  "same on every process; needs --num_processes and --process_id.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Multi-process job: the number of processes (usually one per host)."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "Multi-process job: this process's number, 0 .. --num_processes - 1."
)

_HUGE_PAGES = flags.DEFINE_bool(
  "huge_pages",
  True,
  "Restart once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (Linux, glibc >= 2.35) so that "
  "large host buffers use transparent huge pages instead of faulting in 4 KiB pages at "
  "every step. See m6_jax/host_memory.py.",
)

# --mode=aot (and --mode=params, which needs no flag of its own)
_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "aot: TPU topology, e.g. v5p:4x4x4 (default: the config file's TOPOLOGY)."
)
_AOT_OUTPUT = flags.DEFINE_string(
  "aot_output", None, "aot: where to write the JSON report (default: --workdir/aot.json or none)."
)

# --mode=generate, eval and export (all read a checkpoint of --workdir)
_CHECKPOINT_STEP = flags.DEFINE_integer(
  "checkpoint_step", None, "generate/eval/export: the checkpoint step to load (default: latest)."
)
_BEST = flags.DEFINE_bool(
  "best", False, "generate/eval/export: load the best checkpoint kept in <workdir>/best instead."
)
_CODES_DIR = flags.DEFINE_string(
  "codes_dir", None, "encode_images: a new directory for the code grids of the data source."
)
_EXPORT_DIR = flags.DEFINE_string(
  "export_dir", None, "export: a new directory for the parameters, config and tokenizer."
)
_IMAGE = flags.DEFINE_multi_string(
  "image", [], "generate: image file(s) to caption, or to ask --question about (repeatable)."
)
_QUESTION = flags.DEFINE_multi_string(
  "question", [], "generate: a question about the --image(s) (one for all, or one per image)."
)
_PROMPT = flags.DEFINE_string("prompt", None, "generate: text whose continuation is generated.")
_DECODING = flags.DEFINE_enum(
  "decoding", "greedy", ["greedy", "beam", "sample"], "generate: the decoding method."
)
_MAX_LEN = flags.DEFINE_integer(
  "max_len", 0, "generate: most tokens to generate, EOS included (0: the config's tgt_len)."
)
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 4, "generate: beams for --decoding=beam.")
_LENGTH_PENALTY = flags.DEFINE_float(
  "length_penalty", 0.6, "generate: GNMT length penalty alpha for --decoding=beam."
)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "generate: --decoding=sample temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "generate: --decoding=sample top-k (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate: --decoding=sample nucleus top-p (1: off).")
_SEED = flags.DEFINE_integer("seed", 0, "generate: --decoding=sample PRNG seed.")
# --mode=generate on a text-to-image model (also reads --temperature/--top_k/--top_p/--seed)
flags.DEFINE_integer("num_images", 4, "generate: images to draw from --prompt.")
flags.DEFINE_string("output_dir", None, "generate: directory for the drawn PNGs and index.")
flags.DEFINE_float("guidance_scale", 3.0, "generate: classifier-free guidance (1: none).")
flags.DEFINE_integer("rerank", 0, "generate: keep the best --num_images of N candidates.")
flags.DEFINE_string("vqgan_workdir", None, "generate: the VQGAN (default: the model's).")
_OUTPUT = flags.DEFINE_string(
  "output",
  None,
  "generate: JSONL the outputs are appended to (default: <workdir>/generate.jsonl); "
  "convert: the new folder.",
)
_NUM_EVAL_EXAMPLES = flags.DEFINE_integer(
  "num_eval_examples", 0, "eval: validation scenes to decode (0: the config's num_eval_examples)."
)
_BASELINES = flags.DEFINE_bool(
  "baselines", False, "eval: also score the untrained model and the most-frequent baseline."
)

# --mode=prepare_data
_INPUT_FORMAT = flags.DEFINE_enum(
  "input_format",
  "image_folder_jsonl",
  ["image_folder_jsonl", "muge_tsv"],
  "prepare_data: image_folder_jsonl (images + JSONL with image/caption/question/answer) or "
  "muge_tsv (id<TAB>base64 image TSV + JSONL of texts keyed by image id).",
)
_INPUT_PATH = flags.DEFINE_string(
  "input_path",
  None,
  "prepare_data: a JSONL file, 'train=a.jsonl,validation=b.jsonl' (MUGE: "
  "'train=texts.jsonl+images.tsv,...'), or a folder whose file names contain the split.",
)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "prepare_data: TFDS data_dir to write into.")
_NAME = flags.DEFINE_string("name", None, "prepare_data: dataset name (a folder in data_dir).")
_IMAGE_DIR = flags.DEFINE_string(
  "image_dir",
  "",
  "prepare_data: folder the JSONL image paths are relative to (default: the JSONL's folder).",
)
_VALIDATION_FRACTION = flags.DEFINE_float(
  "validation_fraction",
  0.0,
  "prepare_data: share of images (by hash of the image) held out as the validation split "
  "when no validation file is given.",
)
_MAX_TEXT_CHARS = flags.DEFINE_integer("max_text_chars", 1000, "prepare_data: longest text.")
_MAX_IMAGE_SIZE = flags.DEFINE_integer(
  "max_image_size", 512, "prepare_data: images are re-encoded with their long side at most this."
)
_MAX_REJECTED_FRACTION = flags.DEFINE_float(
  "max_rejected_fraction",
  0.1,
  "prepare_data: stop with an error when a split rejects more than this share of records.",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "prepare_data: replace a same-named dataset.")

# What config_flags raises: an unknown `--config.x.y` key, a wrong type, a failing config file.
_CONFIG_ERRORS = (AttributeError, KeyError, ValueError, TypeError, OSError)
_fail = exit_with  # one `error:` line, exit status 2


def _config_args(argv: list[str]) -> str:
  return " ".join(a for a in argv[1:] if a.startswith("--config"))


class _QuietLibraries(pylogging.Filter):
  """Keeps our INFO progress lines readable: libraries only speak up at WARNING or above."""

  _NOISY = ("/orbax/", "/grain/", "/jax/", "/tensorstore/")

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or not any(
      part in record.pathname for part in self._NOISY
    )


def _config_file(argv: list[str]) -> str | None:
  """The --config file named on the command line (without its :variant), or None."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return None


def _fail_config(argv: list[str], error: BaseException) -> None:
  path = _config_file(argv)
  if path and not os.path.isfile(path):
    shipped = (
      sorted(f for f in os.listdir("configs") if f.endswith(".py"))
      if os.path.isdir("configs")
      else []
    )
    _fail(
      f"no such config file: {path}"
      + (f"; the shipped ones are configs/{{{','.join(shipped)}}}" if shipped else "")
    )
  _fail(f"bad config ({_config_args(argv)}): {one_line(error)}")


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(
      f"{one_line(e)} (flags: {_config_args(argv) or ' '.join(argv[1:])}). "
      "Pass --helpshort to see the flags."
    )
  except _CONFIG_ERRORS as e:
    _fail_config(argv, e)


def _load_config(required: bool = True, workdir_hint: str | None = None):
  """The --config value (None when absent and not `required`); exits with one line if it
  failed to load or is missing. `workdir_hint` makes --workdir required too."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.to_dict()  # a config file that failed to load raises its error here
  except _CONFIG_ERRORS as e:
    _fail_config(sys.argv, e)
  if config is None and required:
    _fail(f"--mode={_MODE.value} needs --config, e.g. --config=configs/base.py")
  if workdir_hint and not _WORKDIR.value:
    _fail(f"--mode={_MODE.value} needs --workdir ({workdir_hint}).")
  return config


def run_train() -> None:
  from m6_jax.evaluation import evaluate, vqgan_eval
  from m6_jax.train import loop

  config = _load_config(workdir_hint="e.g. --workdir=/tmp/m6_base")
  evaluator = None
  if config.train.eval_every:
    family_eval = vqgan_eval if config.model.family == "vqgan" else evaluate
    evaluator = family_eval.PeriodicEvaluator(config, _WORKDIR.value)
  result = loop.train(config, _WORKDIR.value, evaluator)
  key = "rec_loss" if config.model.family == "vqgan" else "image_to_text_loss"
  first, last = result.first_metrics, result.last_metrics
  if key in first and key in last:
    start = (
      "step 0 (initial parameters)"
      if result.resumed_from == 0
      else f"step {first['step']} (the first logged step of this run, resumed at step "
      f"{result.resumed_from})"
    )
    print(
      f"{key.replace('_loss', '')} loss: {start}: {first[key]:.4f} -> step {last['step']}: "
      f"{last[key]:.4f} ({last[key] / first[key]:.2f}x)"
    )


def run_prepare_data() -> None:
  from m6_jax.data import prepare

  if not _INPUT_PATH.value or not _NAME.value:
    _fail("--mode=prepare_data needs --input_path and --name (and usually --data_dir).")
  prepare.prepare_data(
    _INPUT_FORMAT.value,
    _INPUT_PATH.value,
    _DATA_DIR.value,
    _NAME.value,
    validation_fraction=_VALIDATION_FRACTION.value,
    image_dir=_IMAGE_DIR.value or None,
    max_text_chars=_MAX_TEXT_CHARS.value,
    max_image_size=_MAX_IMAGE_SIZE.value,
    max_rejected_fraction=_MAX_REJECTED_FRACTION.value,
    overwrite=_OVERWRITE.value,
  )


def run_generate() -> None:
  from m6_jax.data import images
  from m6_jax.infer import generate, text_to_image
  from m6_jax.parallel import multihost

  config = _load_config(required=False, workdir_hint="a trained workdir")
  prompt = _PROMPT.value if _PROMPT.present else None
  if prompt is not None and not prompt.strip():
    _fail("the prompt is empty; pass some text with --prompt.")
  if text_to_image.draws_images(flags.FLAGS, config):
    print(text_to_image.run_from_flags(flags.FLAGS, config))
    return
  for path in _IMAGE.value:  # a bad image fails before the checkpoint is read
    images.load_image_file(path, 8)
  model = generate.load_model(_WORKDIR.value, _CHECKPOINT_STEP.value, config, best=_BEST.value)
  rows = generate.generate(
    model,
    images=_IMAGE.value,
    questions=_QUESTION.value,
    prompt=prompt,
    decoding_method=_DECODING.value,
    max_len=_MAX_LEN.value,
    beam_size=_BEAM_SIZE.value,
    length_penalty=_LENGTH_PENALTY.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    seed=_SEED.value,
  )
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, "generate.jsonl")
  for row in rows:
    inputs = " | ".join(str(row[k]) for k in ("image", "question", "prompt") if k in row)
    print(f"{inputs} -> {row['output']}")
    row["step"] = model.step
  if multihost.is_primary():  # every process generates the same rows; one writes them
    generate.write_jsonl(rows, output)
    print(f"wrote {len(rows)} row(s) to {output}")


def run_eval() -> None:
  from m6_jax.evaluation import evaluate, vqgan_eval

  config = _load_config(required=False, workdir_hint="a trained workdir")
  workdir, step, best = _WORKDIR.value, _CHECKPOINT_STEP.value, _BEST.value
  if vqgan_eval.is_vqgan_workdir(workdir, best):
    return vqgan_eval.run_eval(workdir, step, config, best)
  evaluate.run_eval(workdir, step, config, best, _NUM_EVAL_EXAMPLES.value, _BASELINES.value)


def run_encode_images() -> None:
  from m6_jax.data import image_codes
  from m6_jax.infer.image_tokenizer import ImageTokenizer

  config = _load_config(required=False, workdir_hint="a trained VQGAN workdir")
  if not _CODES_DIR.value:
    _fail("--mode=encode_images needs --codes_dir, a new directory for the code grids.")
  tokenizer = ImageTokenizer.load(_WORKDIR.value, _CHECKPOINT_STEP.value)
  info = image_codes.encode_dataset(tokenizer, config or tokenizer.config, _CODES_DIR.value)
  print(f"wrote the code grids {info['splits']} ({info['grid']} codes each) to {_CODES_DIR.value}")


def run_export() -> None:
  from m6_jax.infer import export, generate

  config = _load_config(required=False, workdir_hint="a trained workdir")
  if not _EXPORT_DIR.value:
    _fail("--mode=export needs --export_dir, a new directory for the exported parameters.")
  model = generate.load_model(_WORKDIR.value, _CHECKPOINT_STEP.value, config, best=_BEST.value)
  sizes = export.export(
    model.params,
    model.step,
    model.checkpoint_dir,
    model.config,
    model.tokenizer,
    generate.tokenizer_path(_WORKDIR.value, model.config),
    _EXPORT_DIR.value,
  )
  mb = 1024**2
  print(
    f"exported step {sizes['step']} ({sizes['num_params']:,} parameters) to "
    f"{_EXPORT_DIR.value}: {sizes['export_bytes'] / mb:.1f} MiB, against "
    f"{sizes['source_bytes'] / mb:.1f} MiB for the checkpoint it came from"
  )


def _config_module():
  """The loaded --config file as a module (for PUBLISHED_PARAMS / TOPOLOGY), or None."""
  import importlib.util

  path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
  spec = importlib.util.spec_from_file_location("_m6_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_params() -> None:
  from m6_jax import config as config_lib
  from m6_jax.model import param_count

  config = _load_config()
  config_lib.validate_for_counting(config)
  published = getattr(_config_module(), "PUBLISHED_PARAMS", None)
  text, _ = param_count.report(config, published)
  print(text)


def run_aot() -> None:
  from m6_jax import aot

  config = _load_config()
  topology = _TOPOLOGY.value or getattr(_config_module(), "TOPOLOGY", None)
  if not topology:
    _fail("--mode=aot needs --topology, e.g. --topology=v5p:4x4x4")
  output = _AOT_OUTPUT.value
  if output is None and _WORKDIR.value:
    output = f"{_WORKDIR.value}/aot.json"
  aot.run(config, topology, output)


MODES = {
  "params": run_params,
  "aot": run_aot,
  "train": run_train,
  "prepare_data": run_prepare_data,
  "generate": run_generate,
  "eval": run_eval,
  "export": run_export,
  "convert": lambda: convert_cli.run(_OUTPUT.value),
  "encode_images": run_encode_images,
}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _HUGE_PAGES.value:  # first: it may restart the process
    from m6_jax import host_memory

    try:
      logging.info(host_memory.restart_with_huge_pages())
    except OSError as e:
      logging.warning("host memory: restart with huge pages failed (%s); running without", e)
  from m6_jax import platforms  # before JAX starts its backends

  chosen = platforms.choose()
  if chosen:
    logging.info(chosen)
  # Imported here so that `--help` and flag errors are instant and don't start JAX; and
  # jax.distributed must start before anything else uses JAX.
  from m6_jax.parallel import multihost

  try:
    if multihost.initialize(
      _COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value
    ):
      logging.info("JAX distributed: %s.", multihost.describe())
  except multihost.DistributedError as e:
    _fail(str(e))

  from m6_jax.errors import UserError

  try:
    MODES[_MODE.value]()
  except (UserError, FileNotFoundError) as e:
    _fail(str(e))
  except KeyboardInterrupt as e:  # training saves on the first Ctrl-C; this is the second
    print(f"interrupted: {e or 'Ctrl-C'}", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
