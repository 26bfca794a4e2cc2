"""python -m mmd_keras.benchmarks <name> [flags]: runs mmd_keras/benchmarks/<name>.py."""

import importlib
import sys

NAMES = ("finetune", "sampler", "unet_pass")


def main():
  if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
    print(f"usage: python -m mmd_keras.benchmarks {{{'|'.join(NAMES)}}} [flags]", file=sys.stderr)
    sys.exit(2)
  name = sys.argv.pop(1)
  importlib.import_module(f"mmd_keras.benchmarks.{name}").main()


if __name__ == "__main__":
  main()
