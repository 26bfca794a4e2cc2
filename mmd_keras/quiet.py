"""TensorFlow quiet unless asked: `quiet_tensorflow()` runs before anything imports TensorFlow
(main.py's first lines). TF writes start-up lines while it is imported, some whatever
TF_CPP_MIN_LOG_LEVEL says (they come before its C++ log is set up), so the import runs with file
descriptor 2 captured and filtered. absl's `-v 0` brings the Python logs back;
TF_CPP_MIN_LOG_LEVEL=0 in the environment the C++ ones.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile

from absl import logging as absl_logging

# A C++ log line (severity, MMDD, time) or a start-up notice TF prints before its log level applies.
_CPP_LINE = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d\d")
_STARTUP_NOISE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called"
                            r"|To enable the following instructions: .* rebuild TensorFlow")
# Python warnings every run triggers and a user cannot act on (tf.recompute_grad on int32 timesteps).
_TF_LOG_NOISE = ("The dtype of the watched tensor must be floating",)


def quiet_tensorflow():
  """Imports TensorFlow with its C++ log below TF_CPP_MIN_LOG_LEVEL (3 unless set) held back, and
  Python logs at WARNING until absl's --verbosity is parsed."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Else absl's app.run raises it to INFO.
  if "tensorflow" not in sys.modules:
    level = os.environ["TF_CPP_MIN_LOG_LEVEL"]
    with _stderr_filtered(int(level) if level.isdigit() else 0):
      import tensorflow  # pylint: disable=unused-import,import-outside-toplevel
  tf_logger = logging.getLogger("tensorflow")
  tf_logger.addFilter(lambda record: not str(record.msg).startswith(_TF_LOG_NOISE))
  # TF gives its logger a stderr handler when imported before absl's; both would print a warning.
  if tf_logger.handlers:
    tf_logger.propagate = False


@contextlib.contextmanager
def _stderr_filtered(min_level):
  """Runs the block with file descriptor 2 captured, then writes back what it wrote but C++ log
  lines below `min_level` and TF's start-up notices."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines(keepends=True):
        match = _CPP_LINE.match(line)
        if not (match and "IWEF".index(match.group(1)) < min_level or _STARTUP_NOISE.match(line)):
          sys.stderr.write(line)
      sys.stderr.flush()
