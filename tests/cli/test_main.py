"""The dispatcher (m6_jax/main.py) before any mode runs: what it says about the command line,
in-process (flags are parsed before the bootstrap starts JAX)."""

import signal
import sys

import pytest
from absl import flags

from m6_jax import main


@pytest.fixture
def run_in_process(monkeypatch, capsys):
  """main.run(argv) here: its exit status and stderr; absl's flags unparsed afterwards."""
  monkeypatch.setattr(sys.modules["__main__"], "__doc__", None, raising=False)
  monkeypatch.setattr(signal, "signal", lambda *a: None)  # main.py ignores Ctrl-C at its end

  def run(*args):
    try:
      with pytest.raises(SystemExit) as stop:
        main.run(["m6-jax", *args])
    finally:
      flags.FLAGS.unparse_flags()
    return stop.value.code, capsys.readouterr().err

  return run


@pytest.mark.parametrize(
  "args, hint",
  [
    (
      ["configs/base.py"],
      "unexpected argument 'configs/base.py'; did you mean --config=configs/base.py?",
    ),
    (
      ["--mode=generate", "configs/base.py:runlocal"],
      "did you mean --config=configs/base.py:runlocal?",
    ),
    (["generate"], "unexpected argument 'generate'; did you mean --mode=generate?"),
    (["config.train.steps=5"], "did you mean --config.train.steps=5?"),
    (["--mode=generate", "scene.png"], "did you mean --image=scene.png?"),
    (
      ["--config=configs/base.py", "a", "b"],
      "unexpected arguments 'a' 'b'; flags are --name=value",
    ),
  ],
)
def test_a_stray_argument_is_one_error_line_with_the_flag_it_meant(run_in_process, args, hint):
  code, err = run_in_process(*args)
  assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
  assert hint in err, err


def test_a_bad_language_is_one_error_line(run_in_process):
  code, err = run_in_process("--mode=generate", "--workdir=/nowhere", "--language=fr")
  assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
  assert "--language=fr" in err and "auto|any|en|zh" in err, err
