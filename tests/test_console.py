"""console.py: --verbosity read before the flags are parsed, TF's start-up lines dropped by level,
progress bars (rate, ETA, terminal vs log output) and start/done lines; a quiet TF run prints
nothing on stderr."""

import io
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT
from mmd_keras import console


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.fixture(autouse=True)
def _quiet_state(monkeypatch):
  """Quiet and shown, whatever an earlier test (or main.py's import) set; wide enough lines."""
  monkeypatch.setattr(console, "_state", dict(verbose=False, progress=True))
  monkeypatch.setenv("COLUMNS", "200")


@pytest.mark.parametrize("args, expected", [
    ([], None),
    (["--mode=sample"], None),
    (["-v", "0"], 0),
    (["-v=1"], 1),
    (["--v=2"], 2),
    (["--verbosity=0"], 0),
    (["--verbosity", "-1"], -1),
    (["-v", "1", "--mode=sample", "--verbosity=0"], 0),  # The last one wins.
    (["--", "-v", "1"], None),  # After "--" nothing is a flag.
    (["-v", "x"], None),  # absl rejects it later.
    (["-v"], None),
    (["--vmodule=1"], None),
])
def test_verbosity_from_argv(args, expected):
  assert console.verbosity_from_argv(["main.py", *args]) == expected


def test_verbosity_from_flagfiles(tmp_path):
  inner = tmp_path / "inner.cfg"
  inner.write_text("# a comment\n--verbosity=1\n")
  outer = tmp_path / "outer.cfg"
  outer.write_text(f"--mode=sample\n// another\n--flagfile={inner}\n")
  read = lambda *args: console.verbosity_from_argv(["main.py", *args])
  assert read(f"--flagfile={outer}") == 1
  assert read("--flagfile", str(outer)) == 1
  assert read(f"--flagfile={outer}", "-v", "0") == 0
  assert read("-v", "0", f"--flagfile={outer}") == 1
  assert read(f"--flagfile={tmp_path / 'missing.cfg'}", "-v", "0") == 0


def test_cpp_lines_below_the_level_are_dropped(capfd):
  lines = [
      "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
      "I0000 00:00:1796092721.930788    3722 port.cc:153] oneDNN custom operations are on.\n",
      "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow "
      "with the appropriate compiler flags.\n",
      "W0000 00:00:1796092721.931423    3722 some.cc:31] a warning\n",
      "E0000 00:00:1796092725.057629    3722 cuda_platform.cc:52] failed call to cuInit\n",
      "text of another kind\n",
  ]
  with console._cpp_startup_lines_dropped(2):
    os.write(2, "".join(lines).encode())
  assert capfd.readouterr().err == lines[4] + lines[5]
  with console._cpp_startup_lines_dropped(0):
    os.write(2, lines[1].encode())
  assert capfd.readouterr().err == lines[1]


def test_rate_and_eta_start_after_the_first_update():
  clock = _Clock()
  bar = console.ProgressBar(10, desc="finetune", unit="steps", initial=2, rate_unit="img",
                            rate_scale=8, stream=io.StringIO(), clock=clock)
  assert bar.rate(clock()) is None and bar.eta(clock()) is None
  clock.now += 30  # The first step traces the graph.
  bar.update(loss=0.5)
  assert bar.rate(clock()) is None
  assert bar.line(clock()) == "finetune: 3/10 steps (30%), loss 0.5, ETA ?"
  for _ in range(2):
    clock.now += 4
    bar.update(loss=0.25)
  assert bar.rate(clock()) == pytest.approx(0.25)
  assert bar.eta(clock()) == pytest.approx(20.0)
  assert bar.line(clock()) == "finetune: 5/10 steps (50%), 2 img/s, loss 0.25, ETA 20 s"
  clock.now += 3600 + 2  # The final line counts the first step's time too.
  assert bar.line(clock(), final=True) == (
      "finetune: 5/10 steps (50%), 0.00443 img/s, loss 0.25, in 1:00:40")


def test_a_single_update_is_timed_from_the_start():
  clock = _Clock()
  bar = console.ProgressBar(6, desc="pretrain", unit="steps", initial=5, stream=io.StringIO(),
                            clock=clock)
  clock.now += 2
  bar.update()  # A resumed run's one remaining step.
  assert bar.line(clock(), final=True) == "pretrain: 6/6 steps (100%), 0.5 steps/s, in 2 s"


def test_a_log_gets_a_line_every_interval_and_one_at_the_end():
  clock, stream = _Clock(), io.StringIO()
  with console.ProgressBar(100, desc="sampling", unit="images", interval=30, stream=stream,
                           clock=clock) as bar:
    for _ in range(10):
      clock.now += 10
      bar.update(10)
  lines = stream.getvalue().splitlines()
  assert lines == ["sampling: 30/100 images (30%), 1 images/s, ETA 1:10",
                   "sampling: 60/100 images (60%), 1 images/s, ETA 40 s",
                   "sampling: 90/100 images (90%), 1 images/s, ETA 10 s",
                   "sampling: 100/100 images (100%), 1 images/s, in 1:40"]


def test_a_terminal_gets_one_line_rewritten():
  clock, stream = _Clock(), _Terminal()
  with console.ProgressBar(3, desc="sampling", unit="images", stream=stream, clock=clock) as bar:
    for _ in range(3):
      clock.now += 1
      bar.update()
  out = stream.getvalue()
  assert out.count("\r") == 5  # At the start, after each update, at the end.
  # Padded over the longer line before it, then ended.
  assert out.split("\r")[-1] == "sampling: 3/3 images (100%), 1 images/s, in 3 s \n"


def test_verbose_output_is_log_lines_even_on_a_terminal(monkeypatch):
  monkeypatch.setitem(console._state, "verbose", True)
  stream = _Terminal()
  with console.ProgressBar(2, desc="sampling", stream=stream, clock=_Clock()) as bar:
    bar.update(2)
  assert "\r" not in stream.getvalue() and stream.getvalue().startswith("sampling: 2/2 items")


def test_a_failed_loop_leaves_the_last_state_to_the_error():
  for stream, expected in ((io.StringIO(), ""), (_Terminal(), None)):
    with pytest.raises(RuntimeError):
      with console.ProgressBar(4, desc="sampling", stream=stream, clock=_Clock()) as bar:
        bar.update(1)
        raise RuntimeError("boom")
    if expected is not None:
      assert stream.getvalue() == expected
    else:
      assert stream.getvalue().endswith("\n") and "in " not in stream.getvalue()


def test_hidden_progress_writes_nothing(capsys):
  console.show_progress(False)
  stream = _Terminal()
  with console.ProgressBar(2, desc="sampling", stream=stream) as bar:
    bar.update(2)
  with console.timed("writing", stream=stream):
    pass
  console.note("resumed")
  assert stream.getvalue() == "" and capsys.readouterr().err == ""


def test_timed_says_when_a_long_call_starts_and_ends():
  clock, stream = _Clock(), io.StringIO()
  with console.timed("writing the SavedModel", stream=stream, clock=clock):
    clock.now += 75
  assert stream.getvalue() == "writing the SavedModel ...\nwriting the SavedModel: done in 1:15\n"
  terminal = _Terminal()
  with console.timed("converting", stream=terminal, clock=clock):
    clock.now += 2
  assert terminal.getvalue() == "converting ... done in 2 s\n"


def test_notes_are_plain_lines_when_quiet(capsys):
  console.note("resumed from ckpt-4 at step 4")
  assert capsys.readouterr().err == "resumed from ckpt-4 at step 4\n"


@pytest.mark.slow
def test_a_quiet_tensorflow_prints_nothing_but_real_warnings():
  script = "\n".join([
      "import sys",
      "from mmd_keras import console",
      "assert 'tensorflow' not in sys.modules",
      "console.quiet(console.verbosity_from_argv(sys.argv))",
      "import tensorflow as tf",
      "from absl import logging",
      "logging.use_absl_handler()  # What absl's app.run does.",
      "logging.info('an info line')",
      "with tf.GradientTape() as tape:",
      "  tape.watch(tf.constant(1))  # TF warns: an int32 tensor cannot be watched.",
      "tf.get_logger().warning('a real warning')",
      "print(float(tf.reduce_sum(tf.ones([3]))), tf.config.list_physical_devices('CPU')[0].name)",
  ])
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("3.0 ")
  assert result.stderr == "WARNING:tensorflow:a real warning\n"
