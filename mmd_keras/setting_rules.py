"""How a setting's flag text becomes its value (parsers) and the rules a value keeps (checks), as
`settings.SETTINGS` names them. A parser takes the field (for its error) and the flag's value; a
check returns what is wrong, or None."""

import re

from mmd_keras import features as features_lib
from mmd_keras import samplers
from mmd_keras import schedule as schedule_lib
from mmd_keras.errors import ParameterError
from mmd_keras.errors import renamed


# Rules a value keeps: each returns what is wrong, or None.
def positive(value):
  return None if value > 0 else "must be > 0"  # NaN fails too.


def at_least(bound, why=""):
  return lambda value: None if value >= bound else f"must be >= {bound}{why}"


def non_negative_clip(value):
  return None if value >= 0 else "must be >= 0 (0 disables clipping)"


def fraction(*, include_one):
  def check(value):
    inside = 0 <= value <= 1 if include_one else 0 <= value < 1
    return None if inside else f"must be in [0, 1{']' if include_one else ')'}"
  return check


def positive_fraction(value):
  return None if 0 < value <= 1 else "must be in (0, 1]"


def local_path(value):
  # Our checks and writes (makedirs, os.replace, os.access) are POSIX calls: on gs://… they would
  # act on a local folder named "gs:".
  if "://" in value:
    return ("is a remote (scheme://) path, which is not supported; expected a local directory or "
            "a shared POSIX filesystem (e.g. NFS, or a bucket mounted with gcsfuse)")
  return None


# Parsers of flag text: each gets the field (for its error) and the flag's value.
def _numbers(field, items, kind, what):
  try:
    return tuple(kind(v) for v in items)
  except ValueError:
    raise ParameterError(field, f"must be a comma-separated list of {what}",
                         value=list(items)) from None


def ints(field, items):
  return _numbers(field, items, int, "integers")


def floats(field, items):
  return _numbers(field, items, float, "numbers")


def step_budgets(field, steps):
  """'5,10,20' (or a list of strings or ints) -> (5, 10, 20): distinct step budgets >= 1."""
  items = steps.split(",") if isinstance(steps, str) else list(steps)
  items = [str(v).strip() for v in items if str(v).strip()]
  if not items:
    raise ParameterError(field, "is empty; expected a comma-separated list of step budgets like "
                         "5,10,20")
  parsed = ints(field, items)
  if any(k < 1 for k in parsed):
    raise ParameterError(field, "entries must be >= 1", value=items)
  repeated = sorted({k for k in parsed if parsed.count(k) > 1})
  if repeated:
    raise ParameterError(field, f"lists K={repeated[0]} more than once; expected distinct step "
                         f"budgets", value=items)
  return parsed


def timesteps(field, value):
  """A spacing name, or "t1,t2,…" (the timesteps themselves) as a tuple of ints."""
  if not isinstance(value, str) or value in schedule_lib.TIMESTEP_KINDS:
    return value
  items = [v.strip() for v in value.split(",")]
  if not all(v.lstrip("-").isdigit() for v in items):
    raise ParameterError(field, f"must be one of {'|'.join(schedule_lib.TIMESTEP_KINDS)} or a "
                         f"comma-separated list of K increasing timesteps", value=value)
  return tuple(int(v) for v in items)


def image_range(field, value):
  """"lo,hi" -> (lo, hi) floats (lo < hi); None stays None."""
  if value is None or isinstance(value, tuple):
    return value
  with renamed(feature_image_range=field):
    return features_lib.parse_image_range(value)


def finetuned_entries(field, entries):
  """((K, path), ...) from "K:path" strings."""
  parsed = []
  for entry in entries:
    if isinstance(entry, tuple):
      parsed.append(entry)
      continue
    k, sep, path = entry.partition(":")
    if not sep or not k.strip().isdigit() or not path:
      raise ParameterError(field, f"entries must look like 5:/path/to/unet.weights.h5, got "
                           f"{entry!r}")
    parsed.append((int(k), path))
  return tuple(parsed)


def sampler_spacings(field, entries):
  """((sampler, spacing), ...) from "sampler:spacing" strings. Whether each fits η and every K is
  checked by the modes that run them (a flagfile's entries must not refuse --eta in other modes)."""
  parsed = []
  for entry in (e.strip() for e in entries if e.strip()):
    name, sep, spacing = (part.strip() for part in entry.partition(":"))
    if not sep:
      raise ParameterError(field, f"entries must look like <sampler>:<spacing> (e.g. "
                           f"dpm_solver_pp:trailing), got {entry!r}")
    if name not in samplers.SAMPLERS:
      raise ParameterError(field, f"entry {entry!r}: the sampler must be one of "
                           f"{'|'.join(samplers.SAMPLERS)}")
    if spacing not in schedule_lib.TIMESTEP_KINDS:
      raise ParameterError(field, f"entry {entry!r}: the spacing must be one of "
                           f"{'|'.join(schedule_lib.TIMESTEP_KINDS)} (explicit timesteps only "
                           f"through {{sampler.timesteps}})", refs=("sampler.timesteps",))
    if (name, spacing) in parsed:
      raise ParameterError(field, f"lists {name}:{spacing} more than once")
    parsed.append((name, spacing))
  return tuple(parsed)


def strings(field, items):
  return tuple(str(v) for v in items or ())


def split_slice(field, value):
  """"test", "test[5000:]" or "test[5000:7500]" -> (split, start, stop or None)."""
  if isinstance(value, tuple):
    return value
  match = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(?:\[\s*(\d*)\s*:\s*(\d*)\s*\])?\s*", value)
  if not match:
    raise ParameterError(field, "must be a split with an optional slice of its images, e.g. test "
                         "or test[5000:] or test[5000:7500]", value=value)
  split, start, stop = match.groups()
  start, stop = int(start or 0), (int(stop) if stop else None)
  if stop is not None and stop <= start:
    raise ParameterError(field, "selects no image (its slice ends before it starts)", value=value)
  return split, start, stop
