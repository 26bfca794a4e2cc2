"""Crash-safe resume and the NaN guard, through main.py as a user runs it.

A run killed with SIGKILL after a checkpoint, or in the middle of saving one, and rerun with the
same command ends with the weights, EMA and optimizer state of an uninterrupted run (same data
batches, noise and dropout); a diverging run stops with one line naming the step and leaves its
last checkpoint intact.
"""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from helpers import REPO_ROOT
from helpers import TINY_UNET
from helpers import assert_user_error
from helpers import randomize_weights
from helpers import run_main
from helpers import tiny_unet
from mmd_keras import checkpoints

FINETUNE_IMAGE_SIZE = 28  # The committed Fashion-MNIST classifier's input size.


def _env():
  return dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
              TF_CPP_MIN_LOG_LEVEL="2")


def _start_main(*args):
  return subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO_ROOT, env=_env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)


# main.py with a SIGKILL at one point of a save, chosen by MMD_TEST_KILL=<point>:<name suffix>:
#   files  a checkpoint's shards are written (<prefix>_temp/), not yet merged under its name;
#   state  its .index and .data files are written, the `checkpoint` state file does not list it;
#   h5     .tmp.unet.weights.h5 (the staging file) is written, not yet renamed to unet.weights.h5.
_KILLING_MAIN = """
import os, runpy, signal, sys
point, _, suffix = os.environ["MMD_TEST_KILL"].partition(":")

def kill_if(name):
  if name.endswith(suffix):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "files":
  from tensorflow.python.ops import gen_io_ops
  merge = gen_io_ops.merge_v2_checkpoints
  def merge_or_die(checkpoint_prefixes, destination_prefix, *args, **kwargs):
    kill_if(destination_prefix.numpy().decode())
    return merge(checkpoint_prefixes, destination_prefix, *args, **kwargs)
  gen_io_ops.merge_v2_checkpoints = merge_or_die
elif point == "state":
  from tensorflow.python.checkpoint import checkpoint_management
  update = checkpoint_management.update_checkpoint_state_internal
  def update_or_die(save_dir, model_checkpoint_path, *args, **kwargs):
    kill_if(model_checkpoint_path)
    return update(save_dir, model_checkpoint_path, *args, **kwargs)
  checkpoint_management.update_checkpoint_state_internal = update_or_die
elif point == "h5":
  replace = os.replace
  def replace_or_die(source, target, *args, **kwargs):
    kill_if(os.fspath(target))
    return replace(source, target, *args, **kwargs)
  os.replace = replace_or_die
else:
  raise ValueError(point)
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""


def _run_killed_in_save(kill, *args):
  """Runs main.py `args`, SIGKILLed at the save point `kill` (see _KILLING_MAIN); its stderr."""
  result = subprocess.run([sys.executable, "-c", _KILLING_MAIN, *args], cwd=REPO_ROOT,
                          env=dict(_env(), MMD_TEST_KILL=kill), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == -signal.SIGKILL, (kill, result.stderr[-3000:])
  return result.stderr


def _kill_after_first_checkpoint(proc, checkpoint_dir, *, timeout=300):
  """SIGKILLs `proc` as soon as its `checkpoint` state file names a checkpoint."""
  deadline = time.time() + timeout
  while tf.train.latest_checkpoint(checkpoint_dir) is None:
    assert proc.poll() is None, f"the run ended (code {proc.returncode}) before a checkpoint"
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed: make it longer"
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL


def _step_of(prefix):
  return int(re.fullmatch(r".*ckpt-(\d+)", prefix).group(1))


def _checkpoint_tensors(prefix):
  """Every saved tensor of a checkpoint but the bookkeeping ones, read back with its reader."""
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if name != "_CHECKPOINTABLE_OBJECT_GRAPH" and not name.startswith("save_counter")}


def _assert_intact(prefix):
  """The checkpoint reads back completely, its step counter is its number, every value finite."""
  tensors = _checkpoint_tensors(prefix)
  assert int(tensors["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"]) == _step_of(prefix)
  for name, value in tensors.items():
    assert np.all(np.isfinite(value)), name
  return tensors


def _assert_same_state(got, want, *, before_resume):
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-12, err_msg=name)
  # The comparison is not vacuous: training went on after the checkpoint the resume started from.
  assert any(not np.allclose(got[name], before_resume[name]) for name in want
             if name.startswith("optimizer/_trainable_variables/"))


PRETRAIN_ARGS = [
    # Dropout, random flips and a fast EMA make every random stream and the EMA matter.
    "--mode=pretrain", "--dataset=fashion_mnist", *TINY_UNET, "--dropout=0.1", "--random_flip",
    "--batch_size=8", "--train_steps=13", "--checkpoint_every=2", "--log_every=5",
    "--ema_decay=0.9", "--init_checkpoint=", "--deterministic"]
FINETUNE_ARGS = [
    "--mode=finetune", "--dataset=fashion_mnist", *TINY_UNET,
    f"--image_size={FINETUNE_IMAGE_SIZE}", "--dropout=0.1", "--finetune_dropout", "--random_flip",
    "--num_steps=2", "--batch_size=4", "--finetune_steps=9", "--checkpoint_every=2",
    "--log_every=5", "--learning_rate=1e-3", "--feature_net=classifier", "--deterministic"]


def _straight_run(workdir, args):
  result = run_main(f"--workdir={workdir}", *args)
  assert result.returncode == 0, result.stderr
  return workdir


@pytest.fixture(scope="module")
def pretrain_straight(tmp_path_factory):
  """The workdir of an uninterrupted pretraining run (13 steps)."""
  return _straight_run(tmp_path_factory.mktemp("pretrain_straight"), PRETRAIN_ARGS)


def _finetune_init(tmp_path):
  path = str(tmp_path / "base.weights.h5")
  unet = randomize_weights(tiny_unet(image_size=FINETUNE_IMAGE_SIZE, dropout=0.1), scale=0.05)
  checkpoints.save_weights_h5(unet, path)
  return path


@pytest.fixture(scope="module")
def finetune_args(tmp_path_factory):
  return [*FINETUNE_ARGS, f"--init_checkpoint={_finetune_init(tmp_path_factory.mktemp('init'))}"]


@pytest.fixture(scope="module")
def finetune_straight(tmp_path_factory, finetune_args):
  """The workdir of an uninterrupted finetuning run (9 steps)."""
  return _straight_run(tmp_path_factory.mktemp("finetune_straight"), finetune_args)


def _resume_and_compare(workdir, args, *, straight, mode_dir, final_step):
  """Reruns the killed run in `workdir`: it must resume from the checkpoint the state file names
  and end with the state of `straight`'s run. Returns the rerun's stderr."""
  checkpoint_dir = str(workdir / mode_dir / "checkpoints")
  # What the state file names after the kill is complete (saves write, then rename).
  latest = tf.train.latest_checkpoint(checkpoint_dir)
  before_resume = _assert_intact(latest)
  assert 0 < _step_of(latest) < final_step

  resumed = run_main(f"--workdir={workdir}", *args)
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from {latest} at step {_step_of(latest)}" in resumed.stderr
  want = _checkpoint_tensors(str(straight / mode_dir / "checkpoints" / f"ckpt-{final_step}"))
  got = _checkpoint_tensors(os.path.join(checkpoint_dir, f"ckpt-{final_step}"))
  _assert_same_state(got, want, before_resume=before_resume)
  return resumed.stderr


def _assert_same_final_weights(workdir, straight, mode_dir):
  got, want = (tiny_unet(image_size=FINETUNE_IMAGE_SIZE) for _ in range(2))
  checkpoints.restore_unet(got, str(workdir / mode_dir / "unet.weights.h5"))
  checkpoints.restore_unet(want, str(straight / mode_dir / "unet.weights.h5"))
  for a, b in zip(got.weights, want.weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-12, err_msg=a.path)


def _files(folder):
  """The names in `folder`, each run's timestamped flags record left out."""
  return sorted(name for name in os.listdir(folder) if not name.startswith("flags_"))


@pytest.mark.slow
def test_pretrain_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, pretrain_straight):
  workdir = tmp_path / "killed"
  _kill_after_first_checkpoint(_start_main(f"--workdir={workdir}", *PRETRAIN_ARGS),
                               str(workdir / "pretrain" / "checkpoints"))
  _resume_and_compare(workdir, PRETRAIN_ARGS, straight=pretrain_straight, mode_dir="pretrain",
                      final_step=13)


@pytest.mark.slow
def test_pretrain_killed_while_writing_a_checkpoint_resumes_from_the_one_before(
    tmp_path, pretrain_straight):
  workdir = tmp_path / "killed"
  checkpoint_dir = workdir / "pretrain" / "checkpoints"
  _run_killed_in_save("files:/ckpt-4", f"--workdir={workdir}", *PRETRAIN_ARGS)
  # Killed with ckpt-4's shards on disk but not yet under its name: ckpt-2 is the latest.
  assert "ckpt-4_temp" in _files(checkpoint_dir)
  assert not glob.glob(str(checkpoint_dir / "ckpt-4.*"))
  assert tf.train.latest_checkpoint(str(checkpoint_dir)) == str(checkpoint_dir / "ckpt-2")
  _resume_and_compare(workdir, PRETRAIN_ARGS, straight=pretrain_straight, mode_dir="pretrain",
                      final_step=13)
  # The rerun's save of ckpt-4 took over the orphaned shards: nothing of the kill is left.
  assert _files(checkpoint_dir) == _files(pretrain_straight / "pretrain" / "checkpoints")


@pytest.mark.slow
def test_finetune_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, finetune_args,
                                                                    finetune_straight):
  workdir = tmp_path / "killed"
  _kill_after_first_checkpoint(_start_main(f"--workdir={workdir}", *finetune_args),
                               str(workdir / "finetune_k2" / "checkpoints"))
  _resume_and_compare(workdir, finetune_args, straight=finetune_straight, mode_dir="finetune_k2",
                      final_step=9)
  _assert_same_final_weights(workdir, finetune_straight, "finetune_k2")


@pytest.mark.slow
def test_finetune_killed_while_saving_resumes_and_writes_the_final_weights(
    tmp_path, finetune_args, finetune_straight):
  workdir = tmp_path / "killed"
  run_dir = workdir / "finetune_k2"
  checkpoint_dir = run_dir / "checkpoints"
  _run_killed_in_save("state:/ckpt-4", f"--workdir={workdir}", *finetune_args)
  # Killed with ckpt-4's files written under its name, before the state file lists it.
  assert glob.glob(str(checkpoint_dir / "ckpt-4.index"))
  latest = tf.train.latest_checkpoint(str(checkpoint_dir))
  assert latest == str(checkpoint_dir / "ckpt-2")
  before_resume = _assert_intact(latest)

  # The rerun resumes from ckpt-2, trains to the end, and is killed between writing the final
  # weights to their temporary name and renaming them.
  stderr = _run_killed_in_save("h5:/unet.weights.h5", f"--workdir={workdir}", *finetune_args)
  assert f"resumed from {latest} at step 2" in stderr
  assert not os.path.exists(run_dir / "unet.weights.h5")
  assert os.path.exists(run_dir / ".tmp.unet.weights.h5")
  straight_checkpoints = finetune_straight / "finetune_k2" / "checkpoints"
  _assert_same_state(_checkpoint_tensors(str(checkpoint_dir / "ckpt-9")),
                     _checkpoint_tensors(str(straight_checkpoints / "ckpt-9")),
                     before_resume=before_resume)

  # The third run finds the finished ckpt-9 and writes the weights the uninterrupted run wrote.
  third = run_main(f"--workdir={workdir}", *finetune_args)
  assert third.returncode == 0, third.stderr
  assert f"resumed from {checkpoint_dir / 'ckpt-9'} at step 9" in third.stderr
  assert "already finetuned for 9" in third.stderr
  _assert_same_final_weights(workdir, finetune_straight, "finetune_k2")
  # Nothing of the kills is left: the orphaned ckpt-4 was saved again and swept, the temporary
  # weights file renamed.
  assert _files(run_dir) == _files(finetune_straight / "finetune_k2")
  assert _files(checkpoint_dir) == _files(straight_checkpoints)


def _assert_stopped_at_nonfinite_step(result, checkpoint_dir):
  """One `error: step S: ...` line; no checkpoint of step S; the last one restores, finite."""
  assert_user_error(result, "non-finite")
  [line] = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  step = int(re.match(r"error: step (\d+): non-finite loss or gradient", line).group(1))
  latest = tf.train.latest_checkpoint(checkpoint_dir)
  assert latest is not None and latest in line
  assert _step_of(latest) < step
  assert not glob.glob(os.path.join(checkpoint_dir, f"ckpt-{step}.*"))
  _assert_intact(latest)
  return latest


@pytest.mark.slow
def test_pretrain_stops_at_a_nonfinite_step_and_keeps_the_last_checkpoint(tmp_path):
  # Adam moves every weight by about the learning rate per step: 1e5 overflows within a few steps.
  result = run_main(f"--workdir={tmp_path}", "--mode=pretrain", "--dataset=fashion_mnist",
                    *TINY_UNET, "--batch_size=8", "--train_steps=30", "--checkpoint_every=1",
                    "--log_every=1", "--pretrain_learning_rate=1e5", "--init_checkpoint=")
  latest = _assert_stopped_at_nonfinite_step(result, str(tmp_path / "pretrain" / "checkpoints"))
  unet = tiny_unet(image_size=8)
  assert checkpoints.restore_unet(unet, latest, use_ema=True) == "ema"
  assert all(np.all(np.isfinite(w.numpy())) for w in unet.weights)


@pytest.mark.slow
def test_finetune_stops_at_a_nonfinite_step_and_keeps_the_last_checkpoint(tmp_path):
  result = run_main(f"--workdir={tmp_path}", "--mode=finetune", "--dataset=fashion_mnist",
                    *TINY_UNET, f"--image_size={FINETUNE_IMAGE_SIZE}", "--num_steps=2",
                    "--batch_size=4", "--finetune_steps=30", "--checkpoint_every=1",
                    "--log_every=1", "--learning_rate=1e5", "--feature_net=classifier",
                    f"--init_checkpoint={_finetune_init(tmp_path)}")
  run_dir = tmp_path / "finetune_k2"
  latest = _assert_stopped_at_nonfinite_step(result, str(run_dir / "checkpoints"))
  assert not os.path.exists(run_dir / "unet.weights.h5")
  unet = tiny_unet(image_size=FINETUNE_IMAGE_SIZE)
  assert checkpoints.restore_unet(unet, latest, use_ema=False) == "raw"
  assert all(np.all(np.isfinite(w.numpy())) for w in unet.weights)


def test_save_weights_h5_never_leaves_a_half_written_file(tmp_path, monkeypatch):
  path = str(tmp_path / "unet.weights.h5")
  unet = randomize_weights(tiny_unet(image_size=8), seed=1)
  checkpoints.save_weights_h5(unet, path)
  saved = [w.numpy() for w in unet.weights]

  def crash_midway(target, *args, **kwargs):
    with open(target, "wb") as f:
      f.write(b"\x89HDF\r\n")  # The first bytes of an HDF5 file, then the process "dies".
    raise KeyboardInterrupt

  randomize_weights(unet, seed=2)
  monkeypatch.setattr(unet, "save_weights", crash_midway)
  with pytest.raises(KeyboardInterrupt):
    checkpoints.save_weights_h5(unet, path, overwrite=True)
  restored = tiny_unet(image_size=8)
  checkpoints.restore_unet(restored, path)
  for got, want in zip(restored.weights, saved):
    np.testing.assert_array_equal(got.numpy(), want)
