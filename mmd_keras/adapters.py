"""Low-rank adapters (LoRA) on the UNet, with Keras' own `enable_lora`: a layer's kernel becomes
W + (α/r)·A·B with W frozen, A [.., in, r] random and B [r, out] zero, so the adapted UNet starts
as the base model exactly. Every other weight of the UNet (biases, norms) is frozen too: only A and
B train. An adapters file holds A and B of every adapted layer, by the layer's path, with the
fingerprint of the base weights (`provenance.weights_sha256`) and the rank and targets, so it is
only ever loaded onto the base model and architecture it was trained on. `merged_into` folds
them into a plain UNet: an export of it has no extra ops.
"""

import json

import keras
import numpy as np

from mmd_keras import atomic
from mmd_keras import provenance
from mmd_keras.errors import ParameterError

# Which layers take adapters: every convolution and dense layer, or those of the attention blocks,
# or those of the up-sampling half.
TARGETS = {"all": lambda path: True, "attention": lambda path: "/attn" in path,
           "up": lambda path: "/up_" in path}
_LORA = ("lora_kernel_a", "lora_kernel_b")
_META = "__adapters__"
SUFFIX = ".adapters.npz"


def target_layers(unet, targets="all"):
  """{path: layer} of the convolution and dense layers of `unet` that `targets` (a key of
  TARGETS) adapts."""
  if targets not in TARGETS:
    raise ParameterError("lora_targets", f"must be one of {', '.join(TARGETS)}", value=targets)
  return {layer.path: layer for layer in _layers(unet)
          if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
          and TARGETS[targets](layer.path)}


def _layers(unet):
  """Every layer inside `unet`, nested ones too (Keras' own walk of them)."""
  return unet._flatten_layers(include_self=False)  # pylint: disable=protected-access


def enable(unet, rank, targets="all", *, seed=0):
  """Adapts `unet` (built, holding the base weights) in place at rank `rank`, A drawn from
  `seed`; returns the base weights' fingerprint. Only the adapters stay trainable."""
  base = provenance.weights_sha256(unet.weights)
  _enable(unet, rank, targets, seed=seed)
  return base


def _enable(unet, rank, targets, *, seed=0):
  layers = target_layers(unet, targets)
  limits = rank_limits(unet, targets)
  check_rank(rank, limits)
  for index, (path, layer) in enumerate(layers.items()):
    # Keras' default for A (he_uniform), seeded per layer: a rerun starts from the same adapters.
    initializer = keras.initializers.HeUniform(seed=(seed * 7919 + index) % 2**31)
    layer.enable_lora(min(rank, limits[path]), a_initializer=initializer)
  for weight in unet.weights:
    if not weight.path.endswith(_LORA):
      weight.trainable = False


def rank_limits(unet, targets="all"):
  """{path: the largest rank its kernel can take} of the layers `targets` adapts."""
  # A kernel [..., in, out] is adapted as a matrix [(...)·in, out]: its rank is at most the
  # smaller side. A layer narrower than the rank asked for (e.g. the output convolution to 1
  # channel) gets its full rank; a rank no layer can take is refused.
  return {path: min(int(np.prod(layer.kernel.shape[:-1])), layer.kernel.shape[-1])
          for path, layer in target_layers(unet, targets).items()}


def check_rank(rank, limits):
  """A ParameterError unless 1 <= `rank` <= the largest of `limits` (`rank_limits`)."""
  widest = max(limits.values(), default=0)
  if not 1 <= rank <= widest:
    raise ParameterError("lora_rank", f"must be between 1 and {widest}, the largest rank of an "
                         f"adapted kernel", value=rank)


def adapter_weights(unet):
  """{path: variable} of the adapters' A and B."""
  return {w.path: w for w in unet.weights if w.path.endswith(_LORA)}


def save(unet, path, *, base_sha256, rank, targets):
  """The adapters of `unet` to `path` (.npz), with what they were trained on."""
  meta = dict(base_sha256=base_sha256, rank=rank, targets=targets)
  arrays = {name: np.asarray(w) for name, w in adapter_weights(unet).items()}
  with atomic.staged(path) as staging, open(staging, "wb") as f:
    np.savez(f, **arrays, **{_META: np.frombuffer(json.dumps(meta).encode(), np.uint8)})


def read(path):
  """(settings {base_sha256, rank, targets}, {path: array}) of an adapters file."""
  try:
    with np.load(path) as data:
      arrays = {name: data[name] for name in data.files}
    meta = json.loads(arrays.pop(_META).tobytes().decode())
  except (OSError, ValueError, KeyError) as e:
    raise ParameterError("adapters", f"is not an adapters file ({type(e).__name__})",
                         value=path) from None
  return meta, arrays


def load(unet, path):
  """Adapts `unet` (built, holding the base weights) as the adapters file `path` says and loads
  them; a ParameterError if they were trained on other base weights or another UNet."""
  meta, arrays = read(path)
  base = provenance.weights_sha256(unet.weights)
  if base != meta["base_sha256"]:
    raise ParameterError("adapters", f"were trained on other base weights (sha256 "
                         f"{meta['base_sha256'][:12]}), not these ({base[:12]})", value=path)
  _enable(unet, meta["rank"], meta["targets"])
  _assign(unet, arrays, path)
  return meta


def restore(unet, path):
  """The adapters of `unet` (adapted already) set to those of the file `path` (written by `save`
  from the same adapted UNet: a finetune going back to its best adapters)."""
  _assign(unet, read(path)[1], path)


def _assign(unet, arrays, path):
  weights = adapter_weights(unet)
  shapes = {name: tuple(w.shape) for name, w in weights.items()}
  if shapes != {name: a.shape for name, a in arrays.items()}:
    raise ParameterError("adapters", "were trained on another UNet architecture (their layers "
                         "or shapes differ from the configured UNet's)", value=path)
  for name, weight in weights.items():
    weight.assign(arrays[name])


def is_file(path):
  """Whether `path` names an adapters file (by its suffix, as `beside` names them)."""
  return str(path).endswith(SUFFIX)


def beside(weights_path):
  """<name>.adapters.npz for <name>.weights.h5: where a finetune with adapters saves what a full
  finetune saves as weights."""
  return weights_path[:-len(".weights.h5")] + SUFFIX


def merged_weights(adapted):
  """The weights of the adapted UNet in a plain UNet's order (its `weights` without the adapters),
  each adapted kernel merged, W + (α/r)·A·B: what a plain UNet of the same architecture takes."""
  merged = {id(layer._kernel): layer.kernel  # pylint: disable=protected-access
            for layer in _layers(adapted) if getattr(layer, "lora_enabled", False)}
  return [merged.get(id(w), w) for w in adapted.weights if not w.path.endswith(_LORA)]


def merged_into(adapted, plain):
  """`plain` (a built UNet of the same architecture, no adapters) holding the adapted UNet's
  weights with every adapter folded into its kernel; returns it."""
  for weight, value in zip(plain.weights, merged_weights(adapted), strict=True):
    weight.assign(value)
  return plain
