"""`python -m mmd_keras.benchmarks finetune`: smoke runs on the tiny config (each variant a fresh
TensorFlow process, hence slow) and its refusal of bad input before any child starts.

The sampler benchmark's smoke test is in test_export.py, beside the exported graphs it times.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmd_keras import adapters
from mmd_keras import unet as unet_lib
from mmd_keras.benchmarks import finetune as finetune_benchmark
from mmd_keras.benchmarks import presets

FIGURES = ("rss_after_imports_mib", "rss_after_model_mib", "rss_after_trace_mib",
           "rss_after_first_step_mib", "peak_rss_mib", "first_step_s", "step_s")


def _run(repo_root, *args, env=None):
  return subprocess.run([sys.executable, "-m", "mmd_keras.benchmarks", "finetune", *args],
                        cwd=repo_root, capture_output=True, text=True, timeout=900, env=env)


def _check_figures(row):
  for name in FIGURES:
    assert isinstance(row[name], float) and row[name] > 0, (name, row)
  # The peak counts the imports, the model and the steps: above what the imports alone hold; the
  # high-water marks of the stages never decrease.
  assert row["peak_rss_mib"] > row["rss_after_imports_mib"], row
  assert row["rss_after_trace_mib"] <= row["rss_after_first_step_mib"] <= row["peak_rss_mib"], row


def _assert_refused(main, names):
  """main() exits with a one-line "error: ..." message naming every string of `names`."""
  with pytest.raises(SystemExit) as exit_info:
    main()
  # sys.exit(<str>) prints the string to stderr and exits with status 1.
  message = exit_info.value.code
  assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
  for name in names:
    assert name in message, (name, message)


@pytest.mark.slow
def test_finetune_benchmark_smoke(repo_root, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  json_out = tmp_path / "finetune.json"
  # Rank-2 adapters: the children that finetune the full UNet run in the test below.
  result = _run(repo_root, "--configs=tiny", "--ks=1,2", "--steps=1", "--lora_ranks=2",
                f"--json_out={json_out}")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("# command: python -m mmd_keras.benchmarks finetune --configs=tiny "
                             "--ks=1,2 --steps=1 --lora_ranks=2 --json_out=")
  for field in ("| date: ", "| commit: ", f"| tensorflow: {tf.__version__} |",
                f"| cpus: {os.cpu_count()}"):
    assert field in lines[0], (field, lines[0])
  assert "| K | step s | peak RSS MiB | trained parameters | first step s |" in result.stdout
  assert "[2/2] tiny K=2 batch 4 current" in result.stderr
  report = json.loads(lines[-1])
  assert report == json.loads(json_out.read_text())
  assert report["tensorflow"] == tf.__version__
  assert [(row["config"], row["k"], row["batch_size"], row["tree"]) for row in report["rows"]] == [
      ("tiny", 1, 4, "current"), ("tiny", 2, 4, "current")]
  unet = unet_lib.UNet(**presets.unet_kwargs("tiny")).build_for_inference()
  everything = sum(int(np.prod(w.shape)) for w in unet.weights)
  adapters.enable(unet, 2)
  for row in report["rows"]:
    _check_figures(row)
    assert row["lora_rank"] == 2
    assert row["trained_params"] == sum(int(np.prod(w.shape)) for w in unet.trainable_weights)
    assert 0 < row["trained_params"] < everything / 4
  [ratio] = report["ratios"]
  assert ratio["k_min"] == 1 and ratio["k_max"] == 2 and ratio["peak_rss_ratio"] > 0


@pytest.mark.slow
def test_another_revision_is_measured_beside_this_one(repo_root, tmp_path):
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root,
                        capture_output=True, text=True, check=True).stdout.strip()
  # The ref worktree goes under TMPDIR: here, so the test sees that it is removed.
  result = subprocess.run(
      [sys.executable, "scripts/compare_finetune_step.py", "HEAD", "--configs=tiny", "--ks=1",
       "--steps=1"], cwd=repo_root, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, TMPDIR=str(tmp_path)))
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert f"| tree ref: {tmp_path}" in lines[0] and lines[0].endswith(f"({head})")
  assert "| K | step s ref | step s current | speed-up ref/current |" in result.stdout
  report = json.loads(lines[-1])
  assert [(row["k"], row["tree"]) for row in report["rows"]] == [(1, "ref"), (1, "current")]
  assert report["rows"][0]["commit"] == head
  for row in report["rows"]:
    _check_figures(row)
  assert report["ratios"] == []  # One K: nothing to compare.
  assert os.listdir(tmp_path) == []
  worktrees = subprocess.run(["git", "worktree", "list"], cwd=repo_root, capture_output=True,
                             text=True, check=True).stdout
  assert str(tmp_path) not in worktrees


def test_an_unknown_revision_is_refused(repo_root):
  result = subprocess.run([sys.executable, "scripts/compare_finetune_step.py", "no-such-rev"],
                          cwd=repo_root, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1 and result.stdout == ""
  assert result.stderr.startswith("error: no-such-rev: expected a git revision")


@pytest.mark.slow
def test_finetune_benchmark_measures_both_gradients_side_by_side(repo_root):
  result = _run(repo_root, "--configs=tiny", "--ks=2", "--steps=1", "--gradients=replay,tape")
  assert result.returncode == 0, result.stderr[-2000:]
  assert ("| K | step s current replay | step s current tape | speed-up current replay/current "
          "tape |") in result.stdout
  report = json.loads(result.stdout.splitlines()[-1])
  assert [(row["variant"], row["tree"], row["gradient"]) for row in report["rows"]] == [
      ("current replay", "current", "replay"), ("current tape", "current", "tape")]
  unet = unet_lib.UNet(**presets.unet_kwargs("tiny")).build_for_inference()
  for row in report["rows"]:
    _check_figures(row)
    assert row["trained_params"] == sum(int(np.prod(w.shape)) for w in unet.weights)


def test_variant_names_keep_the_tree_names_for_one_gradient():
  trees = {"ref": "/a", "current": "/b"}
  assert finetune_benchmark.variant_names(trees, ["tape"]) == {
      "ref": ("ref", "tape", 0), "current": ("current", "tape", 0)}
  assert list(finetune_benchmark.variant_names(trees, ["replay", "tape"])) == [
      "ref replay", "ref tape", "current replay", "current tape"]
  assert finetune_benchmark.variant_names({"current": "/b"}, ["tape"], [0, 4]) == {
      "current full": ("current", "tape", 0), "current lora4": ("current", "tape", 4)}


@pytest.mark.parametrize("args, names", [
    (["--ks=0"], ["--ks=0", "comma-separated integers >= 1"]),
    (["--ks=5,x"], ["--ks=5,x", "comma-separated integers >= 1"]),
    (["--batch_size=0"], ["--batch_size=0", "positive integer"]),
    (["--batch_size=8,16"], ["--batch_size=8,16"]),
    (["--steps=0"], ["--steps=0", "positive integer"]),
    (["--configs=fashion,huge"], ["--configs=fashion,huge", "'huge'", "fashion, small, tiny"]),
    (["--trees=ref:/no/such/tree"], ["--trees=ref:/no/such/tree", "checkout"]),
    (["--gradients=replay,keep"], ["--gradients=replay,keep", "'keep'", "replay, tape"]),
    (["--lora_ranks=0,-4"], ["--lora_ranks=0,-4", "comma-separated integers >= 0"]),
    (["--dropout=1"], ["'dropout'"]),
    (["--steps"], ["--steps"]),
    (["--json_out=/no/such/dir/out.json"], ["--json_out=/no/such/dir/out.json",
                                            "existing directory"]),
    (["fashion"], ["'fashion'", "--name=value"]),
], ids=["k_zero", "k_not_int", "batch_zero", "batch_list", "steps_zero", "unknown_config",
        "unknown_tree", "unknown_gradient", "lora_rank_negative", "unknown_option", "option_without_value",
        "json_out_dir_missing", "positional"])
def test_finetune_benchmark_refuses_bad_input(monkeypatch, capsys, args, names):
  def no_child(**kwargs):
    raise AssertionError(f"a child started despite the bad input: {kwargs}")

  monkeypatch.setattr(sys, "argv", ["finetune", *args])
  monkeypatch.setattr(finetune_benchmark, "_run_child", no_child)
  finetune_benchmark.FLAGS.unparse_flags()
  _assert_refused(finetune_benchmark.main, names)
  assert capsys.readouterr().out == ""  # Refused before the header, let alone a child.


@pytest.mark.slow
def test_finetune_benchmark_bad_input_exit_code(repo_root):
  result = _run(repo_root, "--configs=tiny", "--ks=0")
  assert result.returncode != 0
  assert result.stderr == "error: flag --ks=0: expected comma-separated integers >= 1\n"
  assert result.stdout == ""


@pytest.mark.slow
def test_unet_pass_benchmark_smoke(repo_root):
  result = subprocess.run(
      [sys.executable, "-m", "mmd_keras.benchmarks", "unet_pass", "--config=tiny", "--repeats=1"],
      cwd=repo_root, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("# command: python -m mmd_keras.benchmarks unet_pass --config=tiny")
  report = json.loads(lines[-1])
  assert list(report["variants"]) == ["float32 graph", "XLA", "mixed_bfloat16 graph"]
  for row in report["variants"].values():
    assert row["forward_backward_s"] > 0 and row["forward_s"] > 0
  # The model's numbers follow from the measured F and V.
  f, v = (report["variants"]["float32 graph"][key] for key in ("forward_s", "forward_backward_s"))
  assert report["step_model"]["5"]["replayed_s"] == pytest.approx(4 * f + 5 * v)
  # The profile saw the UNet's convolutions.
  assert any("Conv2D" in op for op in report["op_seconds"]), report["op_seconds"]


@pytest.mark.parametrize("args, names", [
    (["--config=huge"], ["--config=huge", "fashion|small|tiny"]),
    (["--batch_size=0"], ["--batch_size=0", "positive integer"]),
    (["--repeats=x"], ["--repeats=x"]),
    (["--ks=5"], ["'ks'"]),
], ids=["unknown_config", "batch_zero", "repeats_not_int", "unknown_option"])
def test_unet_pass_benchmark_refuses_bad_input(monkeypatch, args, names):
  from mmd_keras.benchmarks import unet_pass  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "argv", ["unet_pass", *args])
  unet_pass.FLAGS.unparse_flags()
  _assert_refused(unet_pass.main, names)
