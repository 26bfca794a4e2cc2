"""The DDPM checkpoints released by Ho et al. (TF1 `diffusion_tf`) loaded into our Keras UNet.

The released files (`diffusion_cifar10_model/model.ckpt-790000`,
`diffusion_lsun_church_model/model.ckpt-4432000`, …) are TF1 Saver checkpoints of a TPUEstimator run.
Their variables are named by the original `tf.variable_scope`s under `model/`:

  model/<scope>/W, model/<scope>/b      nn.conv2d W [3, 3, C_in, C_out]; nn.dense / nn.nin W [C_in, C_out]
  model/<scope>/gamma, model/<scope>/beta  tf.contrib.layers.group_norm, [C]
  <weight>/ExponentialMovingAverage     the EMA copy (tf.train.ExponentialMovingAverage, decay 0.9999)
  <weight>/Adam, <weight>/Adam_1        Adam slots                                  (ignored)
  global_step, beta1_power, beta2_power  outside `model/`                             (ignored)

Keras holds the same tensors in the same layouts (Conv2D / Dense `kernel`, `bias`;
GroupNormalization `gamma`, `beta`), so the import is a one-to-one copy with no transposes.
"""

import tensorflow as tf

SCOPE = "model"
EMA_SUFFIX = "/ExponentialMovingAverage"
OPTIMIZER_SLOT_SUFFIXES = ("/Adam", "/Adam_1")
_SHOWN = 3  # How many offending names an error message lists.


class MismatchError(ValueError):
  """A released checkpoint whose variables do not fit the UNet; `label` says which weights
  ("ddpm-ema" or "ddpm-raw") were compared. `checkpoints.restore_unet` names the file and the UNet parameters."""

  def __init__(self, detail, *, label):
    super().__init__(detail)
    self.label = label


def variable_mapping(unet):
  """{original variable name: Keras weight} for a built `unet`, in the original's creation order.

  Built by walking the scopes of `diffusion_tf/models/unet.py::model`; raises RuntimeError if the
  walk and `unet.weights` disagree (each Keras weight must appear exactly once).
  """
  mapping = {}

  def add(name, weight):
    if name in mapping:
      raise RuntimeError(f"ddpm_import: {name} mapped twice")
    mapping[name] = weight

  def linear(scope, layer):  # nn.conv2d, nn.dense and nn.nin all hold W and b.
    add(f"{scope}/W", layer.kernel)
    add(f"{scope}/b", layer.bias)

  def norm(scope, layer):
    add(f"{scope}/gamma", layer.gamma)
    add(f"{scope}/beta", layer.beta)

  def resnet_block(scope, block):
    norm(f"{scope}/norm1", block.norm1)
    linear(f"{scope}/conv1", block.conv1)
    linear(f"{scope}/temb_proj", block.temb_proj)
    norm(f"{scope}/norm2", block.norm2)
    linear(f"{scope}/conv2", block.conv2)
    if block.nin_shortcut is not None:  # The original adds it iff C_in != C_out, as we do.
      linear(f"{scope}/nin_shortcut", block.nin_shortcut)

  def attn_block(scope, attn):
    norm(f"{scope}/norm", attn.norm)
    for part in ("q", "k", "v", "proj_out"):
      linear(f"{scope}/{part}", getattr(attn, part))

  def level(scope, layer, resample):
    for i, block in enumerate(layer.blocks):
      resnet_block(f"{scope}/block_{i}", block)
      if layer.attns:
        attn_block(f"{scope}/attn_{i}", layer.attns[i])
    if layer.resample is not None:
      linear(f"{scope}/{resample}/conv", layer.resample.conv)

  if not unet.weights:
    raise RuntimeError("ddpm_import: build the UNet (unet.build_for_inference()) before mapping it")
  linear(f"{SCOPE}/temb/dense0", unet.temb.dense0)
  linear(f"{SCOPE}/temb/dense1", unet.temb.dense1)
  linear(f"{SCOPE}/conv_in", unet.conv_in)
  for i, layer in enumerate(unet.down):
    level(f"{SCOPE}/down_{i}", layer, "downsample")
  resnet_block(f"{SCOPE}/mid/block_1", unet.mid.block_1)
  attn_block(f"{SCOPE}/mid/attn_1", unet.mid.attn_1)
  resnet_block(f"{SCOPE}/mid/block_2", unet.mid.block_2)
  # `unet.up` runs from the coarsest level down, as the original's `reversed(range(...))`.
  for i, layer in zip(reversed(range(len(unet.up))), unet.up):
    level(f"{SCOPE}/up_{i}", layer, "upsample")
  norm(f"{SCOPE}/norm_out", unet.norm_out)
  linear(f"{SCOPE}/conv_out", unet.conv_out)

  mapped = {id(w) for w in mapping.values()}
  unmapped = [w.path for w in unet.weights if id(w) not in mapped]
  if unmapped or len(mapped) != len(unet.weights):
    raise RuntimeError(f"ddpm_import: the walk misses UNet weights {unmapped[:_SHOWN]}")
  return mapping


def _first(names, sep=", "):
  shown = sep.join(names[:_SHOWN])
  return shown + (f", … ({len(names)} in all)" if len(names) > _SHOWN else "")


def is_released(variable_names):
  """Whether a checkpoint with these variable names is one of the released DDPM checkpoints."""
  return any(name.startswith(SCOPE + "/") for name in variable_names)


def restore(unet, prefix, *, use_ema=True):
  """Copies a released DDPM checkpoint into a built `unet`; returns "ddpm-ema" or "ddpm-raw".

  Takes the `/ExponentialMovingAverage` copies when `use_ema` and the checkpoint has them, the raw
  weights otherwise. Nothing is assigned unless every name and shape matches (else MismatchError).
  """
  reader = tf.train.load_checkpoint(prefix)
  shapes = reader.get_variable_to_shape_map()
  mapping = variable_mapping(unet)
  model_names = [n for n in shapes
                 if n.startswith(SCOPE + "/") and not n.endswith(OPTIMIZER_SLOT_SUFFIXES)]
  ema = {n[:-len(EMA_SUFFIX)] for n in model_names if n.endswith(EMA_SUFFIX)}
  raw = {n for n in model_names if not n.endswith(EMA_SUFFIX)}
  take_ema = use_ema and bool(ema)
  suffix, label = (EMA_SUFFIX, "ddpm-ema") if take_ema else ("", "ddpm-raw")
  available = ema if take_ema else raw

  missing = [name + suffix for name in mapping if name not in available]
  if missing:
    raise MismatchError(f"the checkpoint lacks {_first(missing)}", label=label)
  extra = sorted(name + suffix for name in available - set(mapping))
  if extra:
    raise MismatchError(f"the UNet has no weight for {_first(extra)}", label=label)
  wrong = [f"{name + suffix} is {tuple(shapes[name + suffix])}, the UNet expects "
           f"{tuple(weight.shape)}"
           for name, weight in mapping.items()
           if tuple(shapes[name + suffix]) != tuple(weight.shape)]
  if wrong:
    raise MismatchError(_first(wrong, sep="; "), label=label)

  values = {name: reader.get_tensor(name + suffix) for name in mapping}
  for name, weight in mapping.items():
    weight.assign(values[name])
  return label


def save(unet, prefix):
  """Writes the UNet weights under the original raw names (`model/.../W`, …) at `prefix`."""
  mapping = variable_mapping(unet)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=list(mapping),
                    shape_and_slices=[""] * len(mapping),
                    tensors=[tf.convert_to_tensor(w) for w in mapping.values()])
