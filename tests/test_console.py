"""console.py: TF's start-up lines dropped by level, tqdm progress bars (terminal vs log output),
start/done lines and notes; a quiet TF run prints nothing on stderr."""

import io
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT
from mmd_keras import console
from mmd_keras import quiet


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.fixture(autouse=True)
def _quiet_state(monkeypatch):
  """Quiet and shown, whatever an earlier test (or main.py's import) set."""
  monkeypatch.setattr(console, "_state", dict(verbose=False, progress=True))


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
  with quiet._stderr_filtered(2):
    os.write(2, "".join(lines).encode())
  assert capfd.readouterr().err == lines[4] + lines[5]
  with quiet._stderr_filtered(0):
    os.write(2, lines[1].encode())
  assert capfd.readouterr().err == lines[1]


def test_a_log_gets_plain_lines_with_count_rate_and_the_metrics():
  stream = io.StringIO()
  with console.progress(6, desc="finetune_k5", unit="steps", initial=2, stream=stream) as bar:
    for _ in range(4):
      bar.set_postfix(mmd2="0.5", refresh=False)
      bar.update(1)
  last = stream.getvalue().split("\r")[-1]
  assert last.startswith("finetune_k5: 6/6 steps (100%) [") and "steps/s" in last
  assert last.rstrip().endswith("mmd2=0.5]") and last.endswith("\n")
  assert "\x1b" not in stream.getvalue() and "█" not in stream.getvalue()  # No bar drawn.


def test_a_terminal_gets_a_bar():
  stream = _Terminal()
  with console.progress(3, desc="sampling K=5", unit="images", stream=stream) as bar:
    bar.update(3)
  assert "sampling K=5: 100%|" in stream.getvalue() and "3/3" in stream.getvalue()


def test_verbose_output_is_log_lines_even_on_a_terminal(monkeypatch):
  monkeypatch.setitem(console._state, "verbose", True)
  stream = _Terminal()
  with console.progress(2, desc="sampling", unit="images", stream=stream) as bar:
    bar.update(2)
  assert stream.getvalue().split("\r")[-1].startswith("sampling: 2/2 images (100%)")


def test_hidden_progress_writes_nothing(capsys):
  console.show_progress(False)
  stream = _Terminal()
  with console.progress(2, desc="sampling", unit="images", stream=stream) as bar:
    bar.update(2)
  with console.timed("writing", stream=stream):
    pass
  console.note("resumed")
  assert stream.getvalue() == "" and capsys.readouterr().err == ""


def test_timed_says_when_a_long_call_starts_and_ends():
  stream = io.StringIO()
  with console.timed("writing the SavedModel", stream=stream):
    pass
  assert stream.getvalue() == "writing the SavedModel ...\nwriting the SavedModel: done in 00:00\n"


def test_notes_are_plain_lines_when_quiet(capsys):
  console.note("resumed from ckpt-4 at step 4")
  assert capsys.readouterr().err == "resumed from ckpt-4 at step 4\n"


@pytest.mark.slow
def test_a_quiet_tensorflow_prints_nothing_but_real_warnings():
  script = "\n".join([
      "import sys",
      "from mmd_keras import quiet",
      "assert 'tensorflow' not in sys.modules",
      "quiet.quiet_tensorflow()",
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
