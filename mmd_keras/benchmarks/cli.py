"""The benchmarks' flags, parsed as main.py parses its own: absl flags, each benchmark in its own
FlagValues (so none clashes with main.py's or another's), a bad value a one-line error that names
the flag; and the header facts every benchmark prints first."""

import importlib.metadata
import pathlib
import subprocess
import sys

from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[2]


def parse(flag_values, argv):
  """Parses `argv` (without the program name) into `flag_values`; exits with "error: <one line>"
  on a bad flag or a positional argument."""
  try:
    rest = flag_values(["benchmark", *argv])
  except flags.Error as e:
    sys.exit(f"error: {e}")
  if rest[1:]:
    sys.exit(f"error: unexpected argument {rest[1]!r}; expected --name=value flags")


def ints_at_least(text, bound):
  """The comma-separated integers >= `bound` of `text`, or None if it holds anything else."""
  try:
    values = [int(value) for value in text.split(",")]
  except ValueError:
    return None
  return values if min(values) >= bound else None


def positive_ints(text):
  return ints_at_least(text, 1)


def define_names(name, default, known, help_text, *, noun, flag_values):
  """A flag of distinct comma-separated names out of `known`."""
  flags.DEFINE_string(name, default, f"{help_text} Comma-separated, from: {', '.join(known)}.",
                      flag_values=flag_values)

  def check(text):
    unknown = [n for n in text.split(",") if n not in known]
    if unknown:
      raise flags.ValidationError(f"unknown {noun} {unknown[0]!r}; expected names from "
                                  f"{', '.join(known)}")
    return True

  flags.register_validator(name, check, flag_values=flag_values)


def define_positive_ints(name, default, help_text, *, flag_values):
  """A flag of comma-separated integers >= 1."""
  flags.DEFINE_string(name, default, help_text, flag_values=flag_values)
  flags.register_validator(name, lambda text: positive_ints(text) is not None,
                           message="expected comma-separated integers >= 1",
                           flag_values=flag_values)


def names(text):
  return list(dict.fromkeys(text.split(",")))


def git(*args, cwd=REPO):
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def commit(tree=REPO):
  """The short commit of the git tree `tree`, "-dirty" if tracked files are changed."""
  head = git("rev-parse", "--short", "HEAD", cwd=tree).stdout.strip() or "unknown"
  # Uncommitted changes to tracked files are measured too: say so.
  dirty = git("status", "--porcelain", "--untracked-files=no", cwd=tree).stdout
  return head + ("-dirty" if dirty else "")


def tensorflow_version():
  """The installed TensorFlow's version, read without importing it (a parent process stays
  small)."""
  distributions = importlib.metadata.packages_distributions().get("tensorflow")
  return importlib.metadata.version(distributions[0]) if distributions else "not installed"
