"""What the command line runs: one module per mode, each `run(cfg)` with a checked `config.Config`.

Every mode checks its settings and input files before it loads data or builds a model, and writes
its flags record only once its data is read: a bad run adds at most that record and never touches
an earlier run's files. The modules share `runs` (run directories, the weights a mode starts from)
and `inputs` (data streams, reference images, feature spaces).
"""
