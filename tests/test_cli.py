"""main.py as a user runs it: one-line errors for bad input, and a tiny pretrain -> sample run."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT

TINY_UNET = ["--image_size=8", "--ch=32", "--ch_mult=1,2", "--num_res_blocks=1",
             "--attn_resolutions=", "--dropout=0", "--num_timesteps=20"]


def run_main(*args, timeout=600):
  env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
             TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO_ROOT, env=env,
                        stdin=subprocess.DEVNULL, capture_output=True, text=True,
                        timeout=timeout)


def assert_user_error(result, flag):
  """Exit code != 0 and exactly one stderr line `error: ...` naming `flag`, no traceback."""
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, result.stderr
  assert flag in lines[0]
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, flag", [
    (["--mode=pretrain", "--dataset=foo"], "--dataset"),
    (["--mode=pretrain", "--image_size=30", "--ch=32", "--ch_mult=1,2,2"], "--image_size"),
    (["--mode=sample", "--num_steps=0"], "--num_steps"),
    (["--mode=sample", "--num_steps=2000"], "--num_steps"),
])
def test_bad_flags_give_one_line_errors(tmp_path, args, flag):
  result = run_main(f"--workdir={tmp_path}", *args)
  assert_user_error(result, flag)
  assert not glob.glob(str(tmp_path / "*" / "checkpoints"))


def test_missing_data_files_say_how_to_install(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  result = run_main(f"--workdir={tmp_path / 'run'}", "--mode=pretrain", f"--data_dir={empty}",
                    *TINY_UNET)
  assert_user_error(result, "--data_dir")
  assert "apt-get install -y dataset-fashion-mnist" in result.stderr


def test_unknown_mode_is_refused_by_absl(tmp_path):
  result = run_main(f"--workdir={tmp_path}", "--mode=foo")
  assert result.returncode != 0
  assert "--mode" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_pretrain_then_sample(tmp_path):
  workdir = str(tmp_path / "run")
  common = [f"--workdir={workdir}", "--dataset=fashion_mnist", *TINY_UNET]
  pretrain = ["--mode=pretrain", "--batch_size=8", "--checkpoint_every=2", "--log_every=2",
              "--init_checkpoint="]
  first = run_main(*common, *pretrain, "--train_steps=4")
  assert first.returncode == 0, first.stderr
  assert glob.glob(os.path.join(workdir, "pretrain", "checkpoints", "ckpt-4.index"))
  assert glob.glob(os.path.join(workdir, "pretrain", "samples", "step_0000004.png"))
  flag_files = glob.glob(os.path.join(workdir, "pretrain", "flags_pretrain_*.cfg"))
  assert len(flag_files) == 1
  with open(flag_files[0]) as f:
    saved = f.read().splitlines()
  assert "--ch=32" in saved and "--train_steps=4" in saved

  # A second run with more steps resumes from the checkpoint instead of starting over.
  resumed = run_main(*common, *pretrain, "--train_steps=6")
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr
  assert glob.glob(os.path.join(workdir, "pretrain", "checkpoints", "ckpt-6.index"))

  sample = run_main(*common, "--mode=sample", "--num_images=5", "--num_steps=3",
                    "--sample_batch_size=4")
  assert sample.returncode == 0, sample.stderr
  [npz] = glob.glob(os.path.join(workdir, "sample", "*.npz"))
  [png] = glob.glob(os.path.join(workdir, "sample", "*.png"))
  images = np.load(npz)["images"]
  assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
  assert tf.io.decode_png(tf.io.read_file(png)).shape[-1] == 1
  assert glob.glob(os.path.join(workdir, "sample", "flags_sample_*.cfg"))


# The evaluation's checks, run through main.py's parser and error handler in this process. The
# flagfile's data and bundled models are real: each mistake is the only one.
QUICKSTART_CFG = ["--flagfile=configs/fashion_mnist.cfg"]


def _error_in_process(main_module, capsys, args):
  """The one `error:` line of main.py run with `args` (exit code 2)."""
  with pytest.raises(SystemExit) as exit_info:
    main_module._run_main(main_module._parse_flags(["main.py", *args]))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


@pytest.mark.parametrize("args, names", [
    (["--mode=evaluate", "--num_eval_images=10001"],
     ["--num_eval_images=10001", "10000 images", "--eval_split=test"]),
    (["--mode=evaluate", "--eval_split=train", "--num_eval_images=60001"],
     ["--num_eval_images=60001", "60000 images"]),
    (["--mode=quickstart", "--quickstart_eval_images=10001"],
     ["--quickstart_eval_images=10001", "10000 images"]),
    (["--mode=evaluate", "--eval_steps=5,10,5"], ["--eval_steps", "K=5 more than once"]),
    (["--mode=evaluate", "--finetuned_checkpoints=5:pretrained/fashion_mnist/unet_ema.weights.h5,"
      "5:pretrained/fashion_mnist/classifier.weights.h5"],
     ["--finetuned_checkpoints", "K=5 twice", "unet_ema.weights.h5", "classifier.weights.h5"]),
])
def test_evaluation_flags_checked_before_any_work(main_module, capsys, monkeypatch, tmp_path,
                                                  args, names):
  monkeypatch.chdir(REPO_ROOT)  # The flagfile's paths are relative to the repository.
  line = _error_in_process(main_module, capsys, [
      *QUICKSTART_CFG, f"--workdir={tmp_path}", f"--export_dir={tmp_path}/export", *args])
  for name in names:
    assert name in line, line
  assert os.listdir(tmp_path) == []  # Refused before the finetune (or sweep) wrote anything.
