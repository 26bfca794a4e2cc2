"""Peak memory and step time of the unrolled K-step MMD finetuning step, with and without recompute.

  python -m mmd_keras.benchmarks finetune [--ks=2,5,10,20] [--batch_size=64] [--steps=2] [--dropout=0]

Each (K, recompute) variant runs in a fresh interpreter, so no variant inherits another's heap. After
building the model and one warm-up step (tracing), the child resets the peak counter of TF's CPU
allocator (`tf.config.experimental.reset_memory_stats`), runs the timed steps and reads its peak: peak
minus the bytes live before the step is the step's transient memory (activations kept for the
backward pass, gradients, recomputed forwards). Every tensor buffer goes through that allocator, so
this is what the step really holds. The resident set's high-water mark (VmHWM after
`clear_refs`, glibc's mmap threshold pinned at 64 KiB) is printed beside it only for comparison: it
stays far below the allocator's figure, so the targets are read from the allocator. The UNet is the fashion_mnist config's (28×28, ch 32, ch_mult 1,2,2, 2 res blocks,
attention at 7) at the config's finetune batch; the feature network is a fixed random conv feature
map, so the unroll is what is measured. `--dropout=1` finetunes with the UNet's dropout (0.1) on: the
masks are then drawn in every forward and replayed by recompute, which must not keep K calls' masks.
"""

import json
import os
import subprocess
import sys
import time

FASHION_UNET = dict(image_size=28, channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                    attn_resolutions=(7,), dropout=0.1)


def _status_kib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def _child(num_steps, recompute, batch_size, steps, dropout):
  import keras
  import numpy as np
  import tensorflow as tf

  from mmd_keras import finetune
  from mmd_keras import mmd
  from mmd_keras import schedule as schedule_lib
  from mmd_keras import unet as unet_lib

  kernel = np.random.default_rng(0).normal(0.0, 1.0 / 3.0, [3, 3, 1, 64]).astype(np.float32)

  def features(images):
    h = tf.nn.relu(tf.nn.conv2d(images, kernel, strides=1, padding="SAME"))
    return tf.reduce_mean(h, axis=[1, 2])

  unet = unet_lib.UNet(**FASHION_UNET).build_for_inference()
  trainer = finetune.MMDFinetuner(
      unet, feature_net=features, schedule=schedule_lib.NoiseSchedule.linear(),
      num_steps=num_steps, kernel=mmd.make_kernel("polynomial"), grad_clip=0.5,
      recompute=recompute, dropout=dropout)
  trainer.compile(optimizer=keras.optimizers.Adam(5e-6))
  trainer.optimizer.build(unet.trainable_weights)
  step = tf.function(trainer.train_step)
  x_real = tf.random.uniform([batch_size, 28, 28, 1], -1.0, 1.0, seed=0)
  step(x_real)  # Trace, optimise the graph and warm up: the steady-state step is measured.
  # TF's CPU allocator counts every tensor buffer: its peak is the memory the step really holds.
  tf.config.experimental.reset_memory_stats("CPU:0")
  baseline = tf.config.experimental.get_memory_info("CPU:0")["current"]
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  rss_baseline = _status_kib("VmRSS")
  start = time.perf_counter()
  for _ in range(steps):
    float(step(x_real)["mmd2"])
  seconds = (time.perf_counter() - start) / steps
  peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
  rss_peak = _status_kib("VmHWM")
  print(json.dumps(dict(k=num_steps, recompute=recompute, dropout=dropout, peak_mib=(peak - baseline) / 2**20,
                        rss_peak_mib=(rss_peak - rss_baseline) / 1024, step_s=seconds)))


def _parse(argv):
  options = dict(ks="2,5,10,20", batch_size="64", steps="2", dropout="0")
  for arg in argv:
    name, _, value = arg.lstrip("-").partition("=")
    if name not in options:
      sys.exit(f"unknown option {arg}; options: {', '.join('--' + o for o in options)}")
    options[name] = value
  if options["dropout"] not in ("0", "1"):
    sys.exit(f"--dropout must be 0 or 1, got {options['dropout']}")
  return ([int(k) for k in options["ks"].split(",")], int(options["batch_size"]),
          int(options["steps"]), options["dropout"] == "1")


def main():
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    k, recompute, batch_size, steps, dropout = sys.argv[2:7]
    _child(int(k), recompute == "1", int(batch_size), int(steps), dropout == "1")
    return
  ks, batch_size, steps, dropout = _parse(sys.argv[1:])
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TF_CPP_MIN_LOG_LEVEL="2")
  rows = []
  for recompute in (True, False):
    for k in ks:
      out = subprocess.run(
          [sys.executable, "-m", "mmd_keras.benchmarks.finetune", "--child", str(k),
           str(int(recompute)), str(batch_size), str(steps), str(int(dropout))],
          env=env, capture_output=True, text=True, check=True)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(f"  K={k} recompute={recompute}: {rows[-1]['peak_mib']:.0f} MiB, "
            f"{rows[-1]['step_s']:.2f} s/step", file=sys.stderr)
  by = {(r["k"], r["recompute"]): r for r in rows}
  print(f"MMD finetune step, fashion_mnist UNet, batch {batch_size}, dropout "
        f"{'on' if dropout else 'off'}: transient peak of TF's CPU allocator (MiB), mean step time "
        f"(s), and the resident set's high-water mark (MiB)")
  print(f"{'K':>4} | {'recompute MiB':>13} | {'plain MiB':>9} | {'plain/recompute':>15} | "
        f"{'recompute s':>11} | {'plain s':>7} | {'RSS recompute':>13} | {'RSS plain':>9}")
  for k in ks:
    r, p = by[(k, True)], by[(k, False)]
    print(f"{k:>4} | {r['peak_mib']:>13.0f} | {p['peak_mib']:>9.0f} | "
          f"{p['peak_mib'] / r['peak_mib']:>15.2f} | {r['step_s']:>11.2f} | {p['step_s']:>7.2f} | "
          f"{r['rss_peak_mib']:>13.0f} | {p['rss_peak_mib']:>9.0f}")
  summary = dict(batch_size=batch_size, dropout=dropout, rows=rows)
  if 5 in ks and 20 in ks:
    summary["recompute_peak_k20_over_k5"] = by[(20, True)]["peak_mib"] / by[(5, True)]["peak_mib"]
    summary["plain_over_recompute_k20"] = by[(20, False)]["peak_mib"] / by[(20, True)]["peak_mib"]
    print(f"targets: recompute peak(K=20)/peak(K=5) = {summary['recompute_peak_k20_over_k5']:.2f} "
          f"(≤ 1.3); plain/recompute at K=20 = {summary['plain_over_recompute_k20']:.2f} (≥ 3)")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
