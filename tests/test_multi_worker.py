"""`main.py --strategy=multi_worker`: two worker processes on localhost train what one process does.

Two `main.py` processes form a MultiWorkerMirroredStrategy cluster through TF_CONFIG (127.0.0.1,
ports picked by binding port 0), share one --workdir as workers on a shared filesystem would, and
MMD-finetune a tiny UNet on the global batch a single process sees. The final weights and the MMD²
of every step must agree with single processes under `--strategy=mirrored` and `default`.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from helpers import REPO_ROOT
from helpers import TINY_UNET
from helpers import assert_user_error
from helpers import randomize_weights
from helpers import run_main
from helpers import tensorboard_summaries
from helpers import tiny_unet
from mmd_keras import classifier as classifier_lib
from mmd_keras import distribute

NUM_WORKERS = 2
GLOBAL_BATCH = 8
FINETUNE_STEPS = 3
TIMEOUT = 600  # Seconds for a whole cluster run; the workers are killed past it.
FINETUNE = ["--mode=finetune", "--dataset=fashion_mnist", *TINY_UNET, "--feature_net=classifier",
            "--num_steps=2", f"--finetune_steps={FINETUNE_STEPS}",
            f"--finetune_batch_size={GLOBAL_BATCH}", "--checkpoint_every=2", "--log_every=1",
            "--learning_rate=1e-3", "--seed=0"]


def free_ports(count):
  """Ports the kernel hands out for port 0 on the loopback interface."""
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def tf_config(ports, index):
  return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                     "task": {"type": "worker", "index": index}})


def worker_env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
  env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
  env.update(extra)
  return env


def run_cluster(*args, log_dir, num_workers=NUM_WORKERS, worker_args=None):
  """Runs `main.py args` (plus `worker_args[i]` on worker i) on `num_workers` workers;
  [(returncode, stderr)] in task order.

  Every worker gets TMPDIR=<log_dir>/tmp, so the temporary directories of non-chief workers can
  be checked for removal. Past TIMEOUT for the whole cluster, or on any failure, all workers are
  killed.
  """
  ports = free_ports(num_workers)
  temp_dir = os.path.join(log_dir, "tmp")
  os.makedirs(temp_dir)
  logs = [os.path.join(log_dir, f"worker{index}.stderr") for index in range(num_workers)]
  workers = []
  deadline = time.monotonic() + TIMEOUT
  try:
    for index, log in enumerate(logs):
      with open(log, "w") as stderr:  # A file, not a pipe: a full pipe would stall its worker.
        workers.append(subprocess.Popen(
            [sys.executable, "main.py", *args, *(worker_args[index] if worker_args else [])],
            cwd=REPO_ROOT,
            env=worker_env(TF_CONFIG=tf_config(ports, index), TMPDIR=temp_dir),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr))
    for w in workers:
      w.wait(timeout=max(0.0, deadline - time.monotonic()))
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
        w.wait()
  results = []
  for w, log in zip(workers, logs):
    with open(log) as f:
      results.append((w.returncode, f.read()))
  return results


def load_unet(path):
  unet = tiny_unet(image_size=8)
  unet.load_weights(path)
  return [w.numpy() for w in unet.weights]


def listing(root):
  """Relative paths of the files under `root`, the timestamped flag file and events left out."""
  paths = []
  for folder, _, files in os.walk(root):
    for name in files:
      if not name.startswith(("flags_", "events.out.tfevents")):
        paths.append(os.path.relpath(os.path.join(folder, name), root))
  return sorted(paths)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A random tiny UNet to start from and a random (untrained, frozen) 8x8 feature classifier."""
  root = tmp_path_factory.mktemp("inputs")
  init = str(root / "init.weights.h5")
  randomize_weights(tiny_unet(image_size=8), seed=5, scale=0.05).save_weights(init)
  classifier = str(root / "classifier.weights.h5")
  keras.utils.set_random_seed(0)
  classifier_lib.build_classifier("classifier", image_size=8, channels=1).save_weights(classifier)
  return [f"--init_checkpoint={init}", f"--classifier_path={classifier}"], init


@pytest.fixture(scope="module")
def finetuned(inputs, tmp_path_factory):
  """Workdirs of the single-process runs (mirrored, default) and of the two-worker run, and the
  workers' stderr."""
  flags, _ = inputs
  root = tmp_path_factory.mktemp("finetune")
  # Two single-process references: under a strategy Keras opens the dataset once more than under
  # `default`, which the Fashion-MNIST stream, a function of (seed, position), does not notice.
  for strategy in ("mirrored", "default"):
    single = run_main(f"--workdir={root / strategy}", *FINETUNE, *flags, f"--strategy={strategy}")
    assert single.returncode == 0, single.stderr[-3000:]
  workers = run_cluster(f"--workdir={root / 'cluster'}", *FINETUNE, *flags,
                        "--strategy=multi_worker", log_dir=root / "logs")
  for index, (code, stderr) in enumerate(workers):
    assert code == 0, f"worker {index}: {stderr[-3000:]}"
  run = "finetune_k2"
  return dict(mirrored=root / "mirrored" / run, default=root / "default" / run,
              cluster=root / "cluster" / run,
              temp_dir=root / "logs" / "tmp",
              stderr=[stderr for _, stderr in workers])


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["mirrored", "default"])
def test_two_workers_take_the_steps_of_one_process(inputs, finetuned, reference):
  _, init = inputs
  single = load_unet(str(finetuned[reference] / "unet.weights.h5"))
  cluster = load_unet(str(finetuned["cluster"] / "unet.weights.h5"))
  start = load_unet(init)
  moved = max(np.abs(s - i).max() for s, i in zip(single, start))
  assert moved > 1e-3  # Adam at lr 1e-3 for 3 steps: the comparison below is not vacuous.
  for s, c in zip(single, cluster):
    np.testing.assert_allclose(c, s, atol=1e-5)

  # --log_every=1: each logged MMD² is the loss of that one step, over the global batch.
  losses = {name: tensorboard_summaries(finetuned[name] / "tensorboard")["mmd2"]
            for name in (reference, "cluster")}
  assert sorted(losses[reference]) == list(range(1, FINETUNE_STEPS + 1))
  assert sorted(losses["cluster"]) == sorted(losses[reference])
  for step, loss in losses[reference].items():
    # MMD² is a difference of kernel means of order 1, so its float32 rounding is absolute.
    np.testing.assert_allclose(losses["cluster"][step], loss, rtol=0, atol=1e-6)
  assert len(set(losses[reference].values())) == FINETUNE_STEPS  # Different batches every step.


@pytest.mark.slow
def test_only_the_chief_writes_and_logs(finetuned):
  # The shared workdir holds one run's files (checkpoints at 2 and 3, samples, final weights), as a
  # single process writes them; the other worker's throwaway directory is gone.
  assert listing(finetuned["cluster"]) == listing(finetuned["mirrored"])
  assert glob.glob(str(finetuned["cluster"] / "checkpoints" / "ckpt-3.index"))
  assert os.listdir(finetuned["temp_dir"]) == []
  assert os.path.isfile(finetuned["cluster"] / "flags.cfg")
  assert os.path.isfile(finetuned["cluster"] / "settings.json")
  chief, other = finetuned["stderr"]
  # The chief's progress bar (its log lines need --verbosity=0); nothing from the other worker.
  assert f"{FINETUNE_STEPS}/{FINETUNE_STEPS} steps (100%)" in chief and "mmd2" in chief
  assert "mmd2" not in other and "steps" not in other


@pytest.mark.slow
def test_a_worker_that_cannot_see_the_chiefs_checkpoints_stops_the_cluster(inputs, finetuned,
                                                                          tmp_path):
  # As on machines without a shared filesystem: the chief's --workdir holds the checkpoint of step
  # 3, the other worker's is empty, so it would start over. Both must stop with one clear line.
  flags, _ = inputs
  chief_workdir = tmp_path / "chief"
  shutil.copytree(finetuned["cluster"].parent, chief_workdir)
  workers = run_cluster(*FINETUNE, *flags, "--strategy=multi_worker",
                        f"--finetune_steps={FINETUNE_STEPS + 1}", log_dir=tmp_path / "logs",
                        worker_args=[[f"--workdir={chief_workdir}"],
                                     [f"--workdir={tmp_path / 'other'}"]])
  for code, stderr in workers:
    assert code == 2, stderr[-3000:]
    [line] = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert f"start at different steps [0, {FINETUNE_STEPS}]" in line and "--workdir" in line
  assert not glob.glob(str(chief_workdir / "finetune_k2" / "checkpoints" / "ckpt-4.index"))


@pytest.mark.slow
def test_a_batch_the_replicas_cannot_split_stops_every_worker(inputs, tmp_path):
  flags, _ = inputs
  workers = run_cluster(f"--workdir={tmp_path / 'run'}", *FINETUNE, *flags, "--finetune_batch_size=9",
                        "--strategy=multi_worker", log_dir=tmp_path / "logs")
  for code, stderr in workers:
    assert code == 2, stderr[-3000:]
    [line] = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert f"--finetune_batch_size=9 must be divisible by the number of replicas ({NUM_WORKERS})" \
        in line


@pytest.mark.slow
def test_pretraining_runs_on_two_workers(tmp_path):
  workers = run_cluster(f"--workdir={tmp_path / 'run'}", "--mode=pretrain", *TINY_UNET,
                        "--dataset=fashion_mnist", "--batch_size=8", "--train_steps=2",
                        "--checkpoint_every=2", "--log_every=1", "--init_checkpoint=",
                        "--strategy=multi_worker", log_dir=tmp_path / "logs")
  for index, (code, stderr) in enumerate(workers):
    assert code == 0, f"worker {index}: {stderr[-3000:]}"
  run = tmp_path / "run" / "pretrain"
  assert glob.glob(str(run / "checkpoints" / "ckpt-2.index"))
  assert glob.glob(str(run / "samples" / "step_0000002.png"))
  losses = tensorboard_summaries(run / "tensorboard")["loss"]
  assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
  assert os.listdir(tmp_path / "logs" / "tmp") == []


@pytest.mark.slow
def test_bad_tf_config_is_a_one_line_error(inputs, tmp_path):
  # Every other malformed TF_CONFIG is covered by test_distribute; this is the path through main.
  flags, _ = inputs
  result = subprocess.run(
      [sys.executable, "main.py", f"--workdir={tmp_path}", *FINETUNE, *flags,
       "--strategy=multi_worker"],
      cwd=REPO_ROOT, env=worker_env(TF_CONFIG="{cluster: worker}"), stdin=subprocess.DEVNULL,
      capture_output=True, text=True, timeout=300)
  assert_user_error(result, "TF_CONFIG")
  assert "TF_CONFIG is not valid JSON" in result.stderr
  assert distribute.TF_CONFIG_EXAMPLE in result.stderr
  assert not os.path.exists(tmp_path / "finetune_k2")
