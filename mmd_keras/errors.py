"""The one exception type for mistakes a user can fix (a flag, a file); `main.py` prints it in one line."""


class UserError(ValueError):
  """A bad flag value or input file; the message names it and says what was expected."""
