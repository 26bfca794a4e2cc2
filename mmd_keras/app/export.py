"""--mode=export: the K-step sampler as a TF Serving SavedModel (<export_dir>/<name>/<version>/)
and a TFLite file, never replacing a file without export.overwrite; weights finetuned with learned
timesteps are exported at those (`runs.learned_timesteps`), as graph constants."""

import os

from mmd_keras import adapters as adapters_lib
from mmd_keras import errors
from mmd_keras import schedule as schedule_lib
from mmd_keras.export import sampler_module as export_sampler
from mmd_keras.export import writers as export_writers
from mmd_keras.app import finetune as finetune_app
from mmd_keras.app import runs
from mmd_keras.errors import ParameterError


# The export writers' parameters -> the configuration's fields.
_FIELDS = dict(export_dir="export.export_dir", model_name="export.model_name",
               model_version="export.model_version", overwrite="export.overwrite")


def check(cfg):
  with errors.renamed(**_FIELDS):
    export_writers.check_model_name(cfg.export.model_name)
  if cfg.run.adapters:
    with errors.renamed(adapters="run.adapters"):
      adapters_lib.read(cfg.run.adapters)


def _tflite_variants(cfg):
  """The float16 settings of the TFLite files to write: none for η > 0 (its sampler draws noise)."""
  if cfg.sampler.eta:
    return ()
  return (False, True) if cfg.export.tflite_float16 else (False,)


def _tflite_path(cfg, version, float16):
  return export_writers.tflite_path(export_dir=cfg.export.export_dir,
                                    model_name=cfg.export.model_name,
                                    num_steps=cfg.sampler.num_steps, float16=float16,
                                    version=version)


def _check_free(cfg):
  """Refuses, before the checkpoint is even read, to replace a version or TFLite file."""
  e = cfg.export
  export_writers.check_version_free(export_writers.version_dir(
      export_dir=e.export_dir, model_name=e.model_name, version=e.model_version),
      overwrite=e.overwrite)
  existing = [p for p in (_tflite_path(cfg, None, f16) for f16 in _tflite_variants(cfg))
              if os.path.exists(p)]
  if existing and not e.overwrite:
    raise ParameterError("export.overwrite", f"is off and {existing[0]} already exists; pass "
                         f"{{export.overwrite}} to replace it", refs=("export.overwrite",))


def run(cfg, *, init_checkpoint=None, adapters=None, next_free_version=False):
  """Writes the sampler to export.model_version.

  `adapters` (default: run.adapters), an adapters file, is merged into the weights: the graph has
  no op more than a full finetune's.

  `next_free_version` (the quickstart, which re-exports on every run): reuse the latest version if
  it holds the same weights and settings, else write the next free version, with TFLite files named
  after it (<name>_k<K>_v<version>.tflite); nothing existing is replaced.
  """
  with errors.renamed(**_FIELDS):
    _run(cfg, init_checkpoint=init_checkpoint, adapters=adapters or cfg.run.adapters,
         next_free_version=next_free_version)


def _run(cfg, *, init_checkpoint, adapters, next_free_version):
  check(cfg)
  e, s = cfg.export, cfg.sampler
  variants = _tflite_variants(cfg)
  if not next_free_version:
    _check_free(cfg)
  init_checkpoint = init_checkpoint or runs.init_checkpoint(cfg)
  learned = runs.learned_timesteps(cfg, init_checkpoint, num_steps=s.num_steps)
  export_writers.make_model_dir(export_dir=e.export_dir, model_name=e.model_name)
  sampler = export_sampler.Sampler.from_schedule(
      runs.restored_unet(cfg, init_checkpoint, adapters=adapters),
      schedule=cfg.diffusion.schedule(),
      num_steps=s.num_steps, sampler=s.sampler,
      timestep_kind=s.timesteps if learned is None else learned, eta=s.eta, clip_x0=s.clip_x0,
      max_images=e.max_images)
  if learned is not None:
    print(f"sampling at the timesteps learned with {init_checkpoint}: "
          f"{schedule_lib.format_timesteps(learned)}")
  _note_finetune(cfg, adapters or init_checkpoint)
  metadata = sampler.metadata()
  version, reused = e.model_version, False
  if next_free_version:
    version, reused = export_writers.next_free_version(
        metadata, export_dir=e.export_dir, model_name=e.model_name, first_version=e.model_version,
        num_steps=s.num_steps, tflite_variants=variants)
  path = export_writers.version_dir(export_dir=e.export_dir, model_name=e.model_name,
                                    version=version)
  if reused:
    print(f"reusing SavedModel {path}: exported from the same weights (sha256 "
          f"{metadata['weights_sha256'][:12]}) and settings; no new version written")
  else:
    export_writers.write_saved_model(sampler, export_dir=e.export_dir, model_name=e.model_name,
                                     version=version, overwrite=e.overwrite)
    print(f"wrote SavedModel {path}")
  if s.eta:
    print("skipped TFLite: it is the deterministic noise -> images sampler (needs eta = 0)")
    return
  for float16 in variants:
    _write_tflite(cfg, sampler, metadata, version=version, float16=float16, reused=reused,
                  next_free_version=next_free_version)


def _note_finetune(cfg, weights):
  """A note if the record of the finetune that made `weights` says it was made for another K or
  sampler than this export samples with (what MMD-DDM finetunes for is one K-step sampler)."""
  made = finetune_app.recorded_settings(weights)
  if made is None:
    return
  k, sampler = made.get("sampler.num_steps"), made.get("sampler.sampler", "ddim")
  if (k, sampler) != (cfg.sampler.num_steps, cfg.sampler.sampler):
    print(f"note: {weights} was finetuned for K={k} through {sampler}; this export samples it at "
          f"K={cfg.sampler.num_steps} through {cfg.sampler.sampler}")


def _write_tflite(cfg, sampler, metadata, *, version, float16, reused, next_free_version):
  path = _tflite_path(cfg, version if next_free_version else None, float16)
  if reused and os.path.exists(path):  # next_free_version checked it is the same model.
    print(f"kept TFLite {path} (the same model)")
  else:
    export_writers.write_tflite(sampler, path, float16=float16, version=version)
    print(f"wrote TFLite {path}")
  plain = _tflite_path(cfg, None, float16)
  record = export_writers.read_tflite_record(plain)
  if next_free_version and os.path.exists(plain) and not export_writers.same_model(record,
                                                                                   metadata):
    origin = (f"version {record.get('saved_model_version')}, weights sha256 "
              f"{str(record.get('weights_sha256'))[:12]}") if record else "no record"
    print(f"note: {plain} holds another model ({origin}); this export's TFLite is {path}")
