"""mmd_keras command line: the flags (generated from `mmd_keras.settings`), the modes, and the one
error handler. What each mode does lives in `mmd_keras.app`.

  python main.py --flagfile=configs/fashion_mnist.cfg                 # the offline quickstart
  python main.py --flagfile=configs/fashion_mnist.cfg --mode=pretrain --init_checkpoint=
  python main.py --flagfile=configs/cifar10.cfg --mode=finetune --init_checkpoint=<ckpt>
"""

import gc
import sys

from mmd_keras import quiet

quiet.quiet_tensorflow()  # Before anything imports TF (its start-up lines).

from absl import app
from absl import flags

from mmd_keras import config as config_lib
from mmd_keras import console
from mmd_keras import errors
from mmd_keras import settings
from mmd_keras.app import evaluate
from mmd_keras.app import export
from mmd_keras.app import finetune
from mmd_keras.app import merge_reports
from mmd_keras.app import pretrain
from mmd_keras.app import quickstart
from mmd_keras.app import runtime
from mmd_keras.app import sample
from mmd_keras.app import train_classifier
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

# mode -> what runs it with the checked configuration.
MODES = {
    "pretrain": pretrain.run,
    "train_classifier": train_classifier.run,
    "finetune": finetune.run,
    "sample": sample.run,
    "evaluate": evaluate.run,
    "export": export.run,
    "quickstart": quickstart.run,
    "merge_reports": merge_reports.run,
}

assert tuple(MODES) == settings.MODES

settings.define_flags(flags.FLAGS)
for _setting in settings.SETTINGS:
  flags.declare_key_flag(_setting.flag)  # --help lists them too.

FLAGS = flags.FLAGS


def flag_of(field):
  """The flag the user set for configuration field `field` ("--name"), or the field itself."""
  return settings.flag_name(field, is_set=lambda flag: FLAGS[flag].value is not None)


def configuration():
  """The checked configuration of the parsed flags (only the run's and the reports' for
  --mode=merge_reports, which builds no model)."""
  values = {s.field: FLAGS[s.flag].value for s in settings.SETTINGS}
  values["run.flags_text"] = FLAGS.flags_into_string()
  if FLAGS.mode == "merge_reports":
    return config_lib.build_merge(values)
  return config_lib.build(values)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; every option is a --flag (flagfile lines "
                    f"too)")
  console.set_verbose(FLAGS.verbosity >= 0)
  cfg = configuration()
  with errors.renamed(**settings.LIBRARY_NAMES):
    if isinstance(cfg, config_lib.Config):
      runtime.prepare(cfg)
    MODES[FLAGS.mode](cfg)


def _parse_flags(argv):
  """absl's flag parsing with its errors (unknown flag, bad value, unreadable flagfile) in one line
  `error: ...` and exit code 2, like every other user error."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, flags.CantOpenFlagFileError):
      message = message.replace("ERROR:: Unable to open flagfile:", "--flagfile cannot be read:")
    print(f"error: {message} (python main.py --helpfull lists every flag)", file=sys.stderr)
    sys.exit(2)


def _run_main(argv):
  try:
    main(argv)
    # Python's exit would collect the whole heap of traced graphs, seconds (11 s after the
    # quickstart) spent freeing memory the OS takes back anyway. Writers are closed by now.
    gc.freeze()
  except ParameterError as e:
    print(f"error: {e.message(flag_of)}", file=sys.stderr)
    sys.exit(2)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(_run_main, flags_parser=_parse_flags)
