"""Files and directories that appear whole or not at all: written beside the target, renamed.

A staging name is hidden and ends with the target's name, `.tmp.<name>` or `.tmp-<random>.<name>`:
writers that check a suffix (Keras' `.weights.h5`) accept it, a glob of the target's kind does not
match it, and TF Serving does not load it. What is staged keeps the umask's permissions (not
mkstemp's 0600), so a server running as another user can read it.
"""

import contextlib
import json
import os
import shutil
import tempfile
import uuid


def _staging_path(path, *, unique):
  directory, name = os.path.split(path)
  token = f"-{uuid.uuid4().hex}" if unique else ""
  return os.path.join(directory, f".tmp{token}.{name}")


@contextlib.contextmanager
def staged(path, *, unique=False):
  """Yields the path to write the file `path` at; renamed to `path` when the block ends, removed
  if it raises.

  The staging name is fixed by default, so a rerun after a kill writes over what the killed run
  left; `unique` gives every writer its own, for targets several processes may write at once
  (a shared cache, an export directory).
  """
  staging = _staging_path(path, unique=unique)
  try:
    yield staging
    os.replace(staging, path)
  finally:
    if os.path.exists(staging):
      os.remove(staging)


@contextlib.contextmanager
def staged_dir(path):
  """Yields a new empty directory beside `path` to fill; when the block ends it replaces `path`
  (an existing one is moved aside, then deleted), and it is deleted if the block raises."""
  staging = _staging_path(path, unique=True)
  os.mkdir(staging)  # Not mkdtemp: its 0700 would survive the rename.
  try:
    yield staging
    if os.path.exists(path):
      aside = tempfile.mkdtemp(prefix=".tmp-", suffix=f".old.{os.path.basename(path)}",
                               dir=os.path.dirname(path))
      os.rename(path, os.path.join(aside, "old"))
      os.rename(staging, path)
      shutil.rmtree(aside, ignore_errors=True)
    else:
      os.rename(staging, path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def write_bytes(path, data, *, unique=False):
  with staged(path, unique=unique) as staging, open(staging, "wb") as f:
    f.write(data)


def write_text(path, text, *, unique=False):
  with staged(path, unique=unique) as staging, open(staging, "w") as f:
    f.write(text)


def write_json(path, value, *, unique=False, indent=2, sort_keys=False):
  """`value` as JSON text with a final newline."""
  write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n", unique=unique)
