"""Fixtures and pytest setup: quiet TF, the repository root, main.py imported in-process. The
helpers the test modules share are in helpers.py."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from helpers import REPO_ROOT


@pytest.fixture
def repo_root():
  return REPO_ROOT


@pytest.fixture
def main_module():
  """main.py imported in this process (its flags defined), the flags reset afterwards."""
  import main
  yield main
  main.FLAGS.unparse_flags()
