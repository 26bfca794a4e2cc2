"""What a user sees on the terminal: tqdm progress bars on the long loops, start/done lines around
long single calls, and notes (TensorFlow's own lines: `quiet`)."""

import contextlib
import sys
import time

import tqdm
from absl import logging as absl_logging

# verbose: absl's --verbosity >= 0; progress: this process shows bars and notes (a cluster's
# workers leave them to the chief).
_state = dict(verbose=False, progress=True)


def set_verbose(verbose):
  """absl's --verbosity asked for logs: bars become log lines, notes absl INFO lines."""
  _state["verbose"] = verbose


def show_progress(enabled):
  _state["progress"] = enabled


def note(message):
  """A line the user sees whatever the verbosity (a resume, a changed setting)."""
  if _state["verbose"]:
    absl_logging.info("%s", message)
  elif _state["progress"]:
    tqdm.tqdm.write(message, file=sys.stderr)  # Above a bar that is being drawn.


def progress(total, *, desc, unit, initial=0, stream=None):
  """A tqdm bar on stderr: redrawn on a terminal, else (a log) a plain line every 30 s."""
  stream = stream or sys.stderr
  dynamic = stream.isatty() and not _state["verbose"]
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream,
                   disable=not _state["progress"], mininterval=0.1 if dynamic else 30.0,
                   dynamic_ncols=dynamic, ascii=not dynamic,
                   bar_format=None if dynamic else
                   "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) "
                   "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")


@contextlib.contextmanager
def timed(desc, *, stream=None):
  """`desc ...` when a long call starts and `desc: done in 23 s` when it ends."""
  stream = stream or sys.stderr
  if _state["progress"]:
    print(f"{desc} ...", file=stream, flush=True)
  started = time.monotonic()
  yield
  if _state["progress"]:
    print(f"{desc}: done in {tqdm.tqdm.format_interval(time.monotonic() - started)}",
          file=stream, flush=True)
