"""What a user sees on the terminal: TensorFlow's log noise off unless asked for, progress bars with a
rate and an ETA on the long loops, start/done lines around long single calls.

  console.quiet(console.verbosity_from_argv(sys.argv))   # before anything imports TensorFlow
  with console.ProgressBar(total, desc="sampling K=5", unit="images", rate_unit="img") as bar:
    ...
    bar.update(len(images))

Quiet is the default. absl's `--verbosity`/`-v` brings the noise back: 0 (INFO) shows what a run
logged before this module existed, 1 (DEBUG) TF's C++ INFO lines too.

This module does not import TensorFlow at import time: `quiet` must set TF_CPP_MIN_LOG_LEVEL before
TF's C++ library loads, and TF writes its start-up lines while it is imported.
"""

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time

from absl import logging as absl_logging

# absl's --verbosity when it is not given: WARNING (absl's app.run would raise an unset one to INFO).
QUIET = -1

# TF's C++ log severities as TF_CPP_MIN_LOG_LEVEL counts them.
_SEVERITIES = "IWEF"
# A C++ log line: severity letter, MMDD, time. Lines written before absl::InitializeLog() ignore
# TF_CPP_MIN_LOG_LEVEL, so `quiet` applies it to them itself.
_CPP_LINE = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d\d")
_STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called"
    # The second line of the C++ INFO notice "This TensorFlow binary is optimized to use ...".
    r"|To enable the following instructions: .* rebuild TensorFlow")
# TF Python warnings that every run triggers and a user cannot act on.
_TF_LOG_NOISE = (
    # tf.recompute_grad (and tape.watch) on int32 arguments such as timesteps, at every trace.
    "The dtype of the watched tensor must be floating",
)

# verbose: --verbosity >= 0 was asked for; progress: this process shows bars and notes.
_state = dict(verbose=False, progress=True)


def verbosity_from_argv(argv):
  """absl's --verbosity as given in `argv` (argv[0] is the program), or None if it is not given.

  Reads -v N, -v=N, --v=N, --verbosity=N, --verbosity N and the same lines in --flagfile files
  (nested too); the last one wins, as in absl. A value that is not an integer gives None: absl
  rejects it when it parses the flags. A flag value that is itself "-v" would be misread.
  """
  args = _expand_flagfiles(list(argv[1:]), depth=0)
  value = None
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    if arg == "--":
      break
    name, sep, text = arg.lstrip("-").partition("=")
    if not arg.startswith("-") or name not in ("v", "verbosity"):
      continue
    if not sep:
      if i == len(args):
        break
      text = args[i]
      i += 1
    try:
      value = int(text)
    except ValueError:
      value = None
  return value


def _expand_flagfiles(args, *, depth):
  """`args` with every --flagfile replaced by the flags in its file (an unreadable file by nothing:
  absl reports it)."""
  expanded = []
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    name, sep, path = arg.lstrip("-").partition("=")
    if not arg.startswith("-") or name != "flagfile" or depth > 10:
      expanded.append(arg)
      continue
    if not sep and i < len(args):
      path = args[i]
      i += 1
    try:
      with open(path) as f:
        lines = [line.strip() for line in f]
    except OSError:
      continue
    expanded += _expand_flagfiles(
        [line for line in lines if line and not line.startswith(("#", "//"))], depth=depth + 1)
  return expanded


def quiet(verbosity=None):
  """Sets up what TensorFlow and absl print for absl's `verbosity` (None: not given, quiet), and
  imports TensorFlow. Call it before anything imports TensorFlow.

  Quiet (verbosity < 0): TF's C++ log is off below FATAL (TF_CPP_MIN_LOG_LEVEL=3 unless the
  environment sets it), the C++ lines TF writes while it is imported are held back, Python log
  lines below WARNING are off, and TF's known harmless warnings are dropped. Verbose (>= 0): what a
  run printed before, TF_CPP_MIN_LOG_LEVEL=2 (0 with verbosity >= 1), nothing dropped.
  """
  verbosity = QUIET if verbosity is None else verbosity
  _state["verbose"] = verbosity >= 0
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL",
                        "3" if verbosity < 0 else "2" if verbosity == 0 else "0")
  if _state["verbose"]:
    import tensorflow  # pylint: disable=unused-import,import-outside-toplevel
    return
  # Setting the flag keeps absl's app.run from raising it to INFO; parsed flags still win.
  absl_logging.set_verbosity(verbosity)
  if "tensorflow" not in sys.modules:
    level = os.environ["TF_CPP_MIN_LOG_LEVEL"]
    with _cpp_startup_lines_dropped(int(level) if level.isdigit() else 0):
      import tensorflow  # pylint: disable=unused-import,import-outside-toplevel
  tf_logger = logging.getLogger("tensorflow")
  if not any(isinstance(f, _DropMessages) for f in tf_logger.filters):
    tf_logger.addFilter(_DropMessages(_TF_LOG_NOISE))
  # TF gives its logger a stderr handler when it is imported before absl's handler is on the root
  # logger; both would print every TF warning.
  if tf_logger.handlers:
    tf_logger.propagate = False


class _DropMessages(logging.Filter):
  def __init__(self, prefixes):
    super().__init__()
    self.prefixes = tuple(prefixes)

  def filter(self, record):
    return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _cpp_startup_lines_dropped(min_level):
  """Runs the block with file descriptor 2 captured, then writes back what it wrote except C++ log
  lines below `min_level` (TF_CPP_MIN_LOG_LEVEL) and absl's notice about them; nothing a real
  error writes is lost unless the process dies inside the block."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(line for line in lines if not _dropped(line, min_level)))
      sys.stderr.flush()


def _dropped(line, min_level):
  match = _CPP_LINE.match(line)
  if match:
    return _SEVERITIES.index(match.group(1)) < min_level
  return bool(_STARTUP_NOISE.match(line))


def show_progress(enabled):
  """Turns the progress bars, start/done lines and notes of this process on or off (a cluster's
  workers leave them to the chief)."""
  _state["progress"] = enabled


def note(message):
  """A line the user sees whatever the verbosity (a resume, a changed setting): plain on stderr
  when quiet, an absl INFO line among the others when verbose."""
  if _state["verbose"]:
    absl_logging.info("%s", message)
  elif _state["progress"]:
    print(message, file=sys.stderr, flush=True)


def _duration(seconds):
  """7 s, 4:05, 1:02:03."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds} s"
  minutes, seconds = divmod(seconds, 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _number(value):
  return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


class ProgressBar:
  """count/total, rate and ETA of a loop, on stderr.

  On a terminal one line is rewritten in place; elsewhere (a pipe, a CI log) a plain line is printed
  at most every `interval` seconds, and one at the end. The rate is measured from the first update
  on, so the first item's start-up cost (tracing, loading) does not skew the ETA; `rate_scale`
  turns items into `rate_unit`s (steps into images: the global batch).
  """

  def __init__(self, total, *, desc, unit="items", initial=0, rate_unit=None, rate_scale=1,
               interval=30.0, stream=None, clock=time.monotonic):
    self.total = total
    self.desc = desc
    self.unit = unit
    self.initial = self.count = initial
    self.rate_unit = rate_unit or unit
    self.rate_scale = rate_scale
    self.interval = interval
    self.stream = stream or sys.stderr
    self.clock = clock
    self.fields = {}
    self.enabled = _state["progress"]
    self.dynamic = self.stream.isatty() and not _state["verbose"]
    self.started = self.shown = clock()
    self.first = None  # (time, count) at the first update.
    self.closed = False
    self.width = 0
    if self.enabled and self.dynamic:
      self._draw(self.started)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc_value, traceback):
    self.close(failed=exc_type is not None)

  def rate(self, now):
    """Items per second since the first update; None before a second one."""
    if self.first is None or self.count == self.first[1] or now <= self.first[0]:
      return None
    return (self.count - self.first[1]) / (now - self.first[0])

  def eta(self, now):
    """Seconds left at the current rate, or None."""
    rate = self.rate(now)
    return None if rate is None else max(self.total - self.count, 0) / rate

  def update(self, n=1, **fields):
    """Adds `n` items; `fields` (e.g. loss=0.12) are shown after the rate until replaced."""
    now = self.clock()
    if self.first is None:
      self.first = (now, self.count + n)
    self.count += n
    self.fields.update(fields)
    if not self.enabled:
      return
    if self.dynamic and now - self.shown >= 0.1:
      self._draw(now)
    elif not self.dynamic and now - self.shown >= self.interval and self.count < self.total:
      self._print(self.line(now))
      self.shown = now

  def close(self, *, failed=False):
    """Ends the bar with the final count, the elapsed time and the rate (`failed`: ends the line a
    terminal shows, and says nothing more: the error will)."""
    if self.closed:
      return
    self.closed = True
    if not self.enabled or (failed and not self.dynamic):
      return
    now = self.clock()
    if self.dynamic:
      if not failed:
        self._draw(now, final=True)
      self.stream.write("\n")
      self.stream.flush()
    else:
      self._print(self.line(now, final=True))

  def line(self, now, *, final=False):
    """`desc: 12/60 steps (20%), 11.8 img/s, loss 0.0312, ETA 4:05` (final: `in 7:40` for ETA)."""
    parts = [f"{self.count}/{self.total} {self.unit}"
             + (f" ({100 * self.count // self.total}%)" if self.total else "")]
    rate = self.rate(now)
    if final and rate is None and now > self.started:
      # A single update: its time is all there is.
      rate = (self.count - self.initial) / (now - self.started)
    if rate is not None:
      parts.append(f"{_number(rate * self.rate_scale)} {self.rate_unit}/s")
    parts += [f"{name} {_number(float(value))}" for name, value in self.fields.items()]
    if final:
      parts.append(f"in {_duration(now - self.started)}")
    else:
      eta = self.eta(now)
      parts.append(f"ETA {_duration(eta) if eta is not None else '?'}")
    return f"{self.desc}: " + ", ".join(parts)

  def _draw(self, now, *, final=False):
    # Cut to the terminal: a wrapped line cannot be rewritten with '\r'.
    text = self.line(now, final=final)[:shutil.get_terminal_size().columns - 1]
    self.stream.write("\r" + text + " " * max(self.width - len(text), 0))
    self.stream.flush()
    self.width = len(text)
    self.shown = now

  def _print(self, text):
    self.stream.write(text + "\n")
    self.stream.flush()


@contextlib.contextmanager
def timed(desc, *, stream=None, clock=time.monotonic):
  """`desc ...` when the block starts and `desc: done in 23 s` when it ends (on a terminal, the
  same line): for long single calls (a SavedModel write, a TFLite conversion)."""
  stream = stream or sys.stderr
  if not _state["progress"]:
    yield
    return
  dynamic = stream.isatty() and not _state["verbose"]
  started = clock()
  stream.write(f"{desc} ..." + ("" if dynamic else "\n"))
  stream.flush()
  try:
    yield
  except BaseException:
    if dynamic:
      stream.write("\n")
    raise
  stream.write((" " if dynamic else f"{desc}: ") + f"done in {_duration(clock() - started)}\n")
  stream.flush()
