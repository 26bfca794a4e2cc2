"""Mistakes a user can fix (a setting, a file): `UserError`, which the command line prints in one
line, and `ParameterError`, a `UserError` about a named parameter.

The library names its own parameters (`num_steps`, `global_batch_size`); the application layer says
which configuration field a parameter came from (`renamed`), and the command line turns fields into
the flags the user set. So a library message never guesses a flag name.
"""

import contextlib
import os


class UserError(ValueError):
  """A bad setting or input file; the message names it and says what was expected."""


class ParameterError(UserError):
  """`parameter` (and `value`, when given) is wrong: "<parameter>=<value> <detail>"; with
  `parameter` None the message is `detail` alone.

  `detail` may name other parameters as `{name}` for each name in `refs`; they are renamed with
  `parameter` and spelled out only when the message is shown.
  """

  _UNSET = object()

  def __init__(self, parameter, detail, *, value=_UNSET, refs=()):
    self.parameter = parameter
    self.detail = detail
    self.value = value
    self.refs = {ref: ref for ref in refs}
    super().__init__()

  def rename(self, mapping):
    """Renames the parameter and its refs by `mapping` (old name -> new name), in place."""
    if self.parameter is not None:
      self.parameter = mapping.get(self.parameter, self.parameter)
    self.refs = {ref: mapping.get(name, name) for ref, name in self.refs.items()}

  def message(self, spell=lambda name: name):
    """The message with every parameter written as `spell(name)` (e.g. its flag)."""
    detail = self.detail
    for ref, name in self.refs.items():
      detail = detail.replace("{" + ref + "}", spell(name))
    if self.parameter is None:
      return detail
    head = spell(self.parameter)
    if self.value is not self._UNSET:
      head += f"={_text(self.value)}"
    return f"{head} {detail}"

  def __str__(self):
    return self.message()


def _text(value):
  if isinstance(value, (list, tuple)):
    return ",".join(str(v) for v in value)
  return "" if value is None else str(value)


@contextlib.contextmanager
def renamed(**mapping):
  """ParameterErrors raised inside name their parameters by `mapping` (library name -> the
  configuration field that supplied it)."""
  try:
    yield
  except ParameterError as e:
    e.rename(mapping)
    raise


def writable_dir(path, *, parameter, value):
  """Creates `path` (a folder under the directory `parameter=value` names) and checks it can be
  written; a ParameterError otherwise."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ParameterError(parameter, f"is not writable (expected a directory that can be created "
                         f"or written): {e.strerror}", value=value) from None
  if not os.access(path, os.W_OK):
    raise ParameterError(parameter, f"is not writable: no write permission on {path}",
                         value=value)
  return path
