"""A PyTorch state_dict read without torch and without running code from the file: the pre-1.6
(non-zip) `torch.save` format, through an unpickler that resolves only tensors, storages and
OrderedDict."""

import collections
import pickle
import struct

import numpy as np

from mmd_keras.errors import UserError

# Pre-1.6 torch.save format: four pickles (magic number, protocol version, system info, the object
# whose tensors name their storages by persistent ids), a pickled list of storage keys, then per key
# an int64 element count and the raw little-endian elements.

_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
_PROTOCOL_VERSION = 1001
_STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
                   "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2",
                   "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?"}


class _Storage:
  def __init__(self, dtype, numel):
    self.dtype = np.dtype(dtype)
    self.numel = numel
    self.data = None


class _TensorRecord:
  def __init__(self, storage, offset, size, stride):
    self.storage = storage
    self.offset = offset
    self.size = tuple(size)
    self.stride = tuple(stride)

  def array(self, path):
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
    if self.offset < 0 or min(self.stride, default=0) < 0 or (
        all(self.size) and last >= self.storage.numel):
      raise UserError(f"{path}: a tensor {self.size} at offset {self.offset} with strides "
                      f"{self.stride} reaches outside its storage of {self.storage.numel} elements")
    item = self.storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(self.storage.data[self.offset:], shape=self.size,
                                           strides=[s * item for s in self.stride])
    return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):  # requires_grad, backward hooks.
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError("a tensor without a storage")
  return _TensorRecord(storage, offset, size, stride)


class _StorageType(str):
  """What a `torch.<Type>Storage` global unpickles to: only ever used as a persistent id field."""


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals a state_dict needs; any other global is refused before it can be
  called."""

  _GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
              ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
              ("torch._utils", "_rebuild_tensor"): _rebuild_tensor}

  def __init__(self, file, storages):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module, name):
    if (module, name) in self._GLOBALS:
      return self._GLOBALS[module, name]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"refusing the global {module}.{name} (only tensors, storages "
                                 f"and OrderedDict may appear in a state_dict)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
    _, storage_type, key, _, numel, view = pid
    if view is not None:
      raise pickle.UnpicklingError("storage views are not supported")
    if key not in self._storages:
      self._storages[key] = _Storage(_STORAGE_DTYPES[storage_type], numel)
    return self._storages[key]


def read_legacy(path):
  """{name: np.ndarray} of a pre-1.6 (non-zip) `torch.save(state_dict)` file, without torch and
  without running code from the file; a one-line UserError for anything else."""
  storages = {}
  try:
    with open(path, "rb") as f:
      if _RestrictedUnpickler(f, {}).load() != _MAGIC_NUMBER:
        raise pickle.UnpicklingError("not a pre-1.6 torch.save file (zip files are not supported)")
      version = _RestrictedUnpickler(f, {}).load()
      if version != _PROTOCOL_VERSION:
        raise pickle.UnpicklingError(f"torch.save protocol {version}, expected "
                                     f"{_PROTOCOL_VERSION}")
      system = _RestrictedUnpickler(f, {}).load()
      if not (isinstance(system, dict) and system.get("little_endian")):
        raise pickle.UnpicklingError("written on a big-endian machine")
      state = _RestrictedUnpickler(f, storages).load()
      keys = _RestrictedUnpickler(f, {}).load()
      if not isinstance(state, dict) or sorted(keys) != sorted(storages):
        raise pickle.UnpicklingError("not a state_dict with one record per storage")
      for key in keys:
        storage = storages[key]
        numel, = struct.unpack("<q", f.read(8))
        raw = f.read(numel * storage.dtype.itemsize)
        if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
          raise pickle.UnpicklingError(f"storage {key} is truncated or of the wrong size")
        storage.data = np.frombuffer(raw, storage.dtype)
  except OSError as e:
    raise UserError(f"{path}: cannot be read: {e.strerror}") from None
  except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError) as e:
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    raise UserError(f"{path}: not a readable torch state_dict: {reason}") from None
  return {name: record.array(path) for name, record in state.items()
          if isinstance(record, _TensorRecord)}
