"""The UNets the benchmarks measure, read from configs/fashion_mnist.cfg as main.py reads it (the
fashion UNet is written once, in the flagfile): each preset is that flagfile plus flags, with the
batch it is measured at."""

import collections
import dataclasses
import pathlib

FLAGFILE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist.cfg"

Preset = collections.namedtuple("Preset", "flags batch_size")
PRESETS = dict(
    fashion=Preset((), 64),  # The bundled base model's UNet.
    small=Preset(("--num_res_blocks=1", "--attn_resolutions="), 32),
    tiny=Preset(("--image_size=8", "--ch_mult=1,2", "--num_res_blocks=1", "--attn_resolutions=",
                 "--dropout=0"), 4),  # For the tests.
)


def unet_kwargs(name):
  """`unet.UNet(**unet_kwargs(name))` builds preset `name` (imports TensorFlow)."""
  from mmd_keras import config  # pylint: disable=import-outside-toplevel
  return dataclasses.asdict(config.from_flagfile(str(FLAGFILE), *PRESETS[name].flags).unet)
