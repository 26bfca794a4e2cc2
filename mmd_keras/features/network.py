"""The contract of a feature network φ: images [N, H, W, C] in [-1, 1] -> features [N, D]
float32, frozen and differentiable with respect to the images; and what the backends share to load
one (freezing a Keras model, resolving a SavedModel's signature, probing it, one-line errors)."""

import tensorflow as tf

from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError


class FeatureError(ParameterError):
  """A feature network that cannot be built because of a parameter or its file."""


class FeatureNetwork:
  """φ(images) -> [N, dim] float32; frozen; `name` is the --feature_net value.

  A plain callable rather than a Keras layer, so a Keras model holding it does not track (and
  checkpoint) its weights. `model` is the underlying Keras model (trainable=False), loaded
  SavedModel or imported graph.
  """

  def __init__(self, *, name, dim, model, call, preprocess, channels):
    self.name = name
    self.dim = dim
    self.model = model
    self.channels = channels
    self._call = call
    self._preprocess = preprocess

  def __call__(self, images):
    images = tf.convert_to_tensor(images, tf.float32)
    if images.shape.rank != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"{self.name}: expected images [N, H, W, {self.channels}], got {images.shape}")
    features = self._call(self._preprocess(images))
    return tf.reshape(tf.cast(features, tf.float32), [-1, self.dim])


def frozen(model):
  """(model, call) with the weights frozen and BatchNorm in inference mode."""
  model.trainable = False
  return model, lambda x: model(x, training=False)


def first_line(e):
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def probe(call, images, *, flag, value, images_text, refs=()):
  """`call(images)`, or a FeatureError on `flag` when the network cannot take them."""
  try:
    return call(images)
  except UserError:
    raise
  except (TypeError, ValueError, tf.errors.OpError) as e:  # E.g. a callable traced for one size.
    raise FeatureError(flag, f"cannot embed {images_text}: {first_line(e)}", value=value,
                       refs=refs) from None


def one_output(outputs, *, names, flag, value, what):
  """The tensor of a model's outputs: the only one, or the first of `names` (dict outputs); a
  FeatureError on `flag` otherwise (`what` names the output wanted)."""
  if isinstance(outputs, dict):
    for key in names:
      if key in outputs:
        return outputs[key]
    if len(outputs) == 1:
      return next(iter(outputs.values()))
    raise FeatureError(flag, f"returns {sorted(outputs)}; expected one output or one named "
                       f"'{names[0]}'", value=value)
  if isinstance(outputs, (list, tuple)):
    if len(outputs) != 1:
      raise FeatureError(flag, f"returns {len(outputs)} outputs; expected {what} only",
                         value=value)
    return outputs[0]
  return outputs


def load_saved_model(path, *, flag, value, help_text="", refs=()):
  """(loaded, call, input shape) of the SavedModel at `path`: its `serving_default` (or `default`,
  or only) signature taking one float image tensor, else the object itself if it is callable (input
  shape unknown). A FeatureError on `flag`=`value` otherwise; `help_text` (naming `refs`) ends its
  messages."""
  tail = f"; {help_text}" if help_text else ""
  try:
    loaded = tf.saved_model.load(path)
  except Exception as e:  # TF raises many types for a broken SavedModel.
    raise FeatureError(flag, f"is not a loadable SavedModel ({first_line(e)}){tail}",
                       value=value, refs=refs) from None
  signatures = dict(getattr(loaded, "signatures", {}))
  if not signatures:
    if not callable(loaded):
      raise FeatureError(flag, f"has no signature and is not callable; expected a "
                         f"serving_default signature taking images [N, H, W, C]{tail}",
                         value=value, refs=refs)
    # Holding `loaded` in the FeatureNetwork keeps its variables alive.
    return loaded, loaded, tf.TensorShape(None)
  signature = (signatures.get("serving_default") or signatures.get("default")
               or (next(iter(signatures.values())) if len(signatures) == 1 else None))
  if signature is None:
    raise FeatureError(flag, f"has the signatures {sorted(signatures)}; expected one, or one "
                       f"named serving_default", value=value)
  args, kwargs = signature.structured_input_signature
  if args or len(kwargs) != 1:
    raise FeatureError(flag, f"has a signature of {len(args) + len(kwargs)} inputs; expected "
                       f"one, images [N, H, W, C]", value=value)
  (input_name, spec), = kwargs.items()
  if not spec.dtype.is_floating or spec.shape.rank not in (None, 4):
    raise FeatureError(flag, f"has a signature taking {spec.dtype.name} {spec.shape}; expected "
                       f"float images [N, H, W, C] (a uint8 input cannot be differentiated)",
                       value=value)
  return loaded, lambda x: signature(**{input_name: x}), spec.shape
