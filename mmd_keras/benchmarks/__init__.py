"""Benchmarks: scripts that print tables of measured figures (never timed unit tests).

  python -m mmd_keras.benchmarks finetune   # memory and step time of the unrolled K-step finetune
  python -m mmd_keras.benchmarks sampler    # latency/throughput of the exported sampler variants
"""
