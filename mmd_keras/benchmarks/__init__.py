"""Benchmarks: scripts that print tables of measured figures (never timed unit tests).

  python -m mmd_keras.benchmarks finetune   # process memory and step time of the K-step finetune
  python -m mmd_keras.benchmarks sampler    # latency/throughput of the exported sampler variants
  python -m mmd_keras.benchmarks unet_pass  # one UNet call's forward / backward and their kernels
"""
