"""atomic.py: a staged file or directory appears whole or not at all, keeps the umask's
permissions, and leaves nothing behind: not on failure, and not after a rerun of a killed write."""

import json
import os

import pytest

from mmd_keras import atomic


def _umask():
  umask = os.umask(0)
  os.umask(umask)
  return umask


def test_staged_file_replaces_the_target_only_when_the_block_ends(tmp_path):
  path = tmp_path / "a.weights.h5"
  path.write_text("old")
  with atomic.staged(str(path)) as staging:
    # Hidden, beside the target, ending with its name (Keras checks the suffix).
    assert os.path.dirname(staging) == str(tmp_path)
    assert os.path.basename(staging) == ".tmp.a.weights.h5"
    with open(staging, "w") as f:
      f.write("new")
    assert path.read_text() == "old"
  assert path.read_text() == "new"
  assert os.listdir(tmp_path) == ["a.weights.h5"]
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()


def test_failed_block_removes_the_staging_file_and_keeps_the_target(tmp_path):
  path = tmp_path / "report.json"
  path.write_text("old")
  with pytest.raises(KeyboardInterrupt):
    with atomic.staged(str(path), unique=True) as staging:
      with open(staging, "w") as f:
        f.write("half")
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == ["report.json"]
  assert path.read_text() == "old"


def test_a_rerun_writes_over_what_a_killed_write_left(tmp_path):
  path = tmp_path / "unet.weights.h5"
  (tmp_path / ".tmp.unet.weights.h5").write_text("left by a killed run")
  atomic.write_text(str(path), "whole")
  assert os.listdir(tmp_path) == ["unet.weights.h5"]
  assert path.read_text() == "whole"


def test_unique_staging_names_differ_per_writer(tmp_path):
  path = str(tmp_path / "m.tflite")
  with atomic.staged(path, unique=True) as first, atomic.staged(path, unique=True) as second:
    assert first != second
    assert os.path.basename(first).startswith(".tmp-") and first.endswith(".m.tflite")
    for staging in (first, second):
      with open(staging, "w") as f:
        f.write(staging)
  assert os.listdir(tmp_path) == ["m.tflite"]


def test_write_json_and_bytes(tmp_path):
  atomic.write_json(str(tmp_path / "a.json"), {"b": 1, "a": [2]}, sort_keys=True)
  assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
  atomic.write_json(str(tmp_path / "row.json"), {"b": 1}, indent=None)
  assert json.loads((tmp_path / "row.json").read_text()) == {"b": 1}
  atomic.write_bytes(str(tmp_path / "x.bin"), b"\0\1")
  assert (tmp_path / "x.bin").read_bytes() == b"\0\1"
  assert sorted(os.listdir(tmp_path)) == ["a.json", "row.json", "x.bin"]


def test_staged_dir_replaces_a_directory_whole(tmp_path):
  target = tmp_path / "1"
  with atomic.staged_dir(str(target)) as staging:
    with open(os.path.join(staging, "saved_model.pb"), "w") as f:
      f.write("v1")
    assert not target.exists()
  assert (target / "saved_model.pb").read_text() == "v1"
  assert os.stat(target).st_mode & 0o777 == 0o777 & ~_umask()
  with pytest.raises(RuntimeError):
    with atomic.staged_dir(str(target)) as staging:
      with open(os.path.join(staging, "saved_model.pb"), "w") as f:
        f.write("half")
      raise RuntimeError("save failed")
  assert (target / "saved_model.pb").read_text() == "v1"
  with atomic.staged_dir(str(target)) as staging:
    with open(os.path.join(staging, "saved_model.pb"), "w") as f:
      f.write("v2")
  assert os.listdir(target) == ["saved_model.pb"]
  assert (target / "saved_model.pb").read_text() == "v2"
  assert os.listdir(tmp_path) == ["1"]
