"""The typed configuration and how its errors reach the user: library parameters renamed to the
configuration's fields, fields spelled as the flag the user actually set."""

import dataclasses

import pytest

from mmd_keras import config as config_lib
from mmd_keras import data as data_lib
from mmd_keras import errors
from mmd_keras import metrics
from mmd_keras import settings
from mmd_keras.app import evaluate as evaluate_app
from mmd_keras.app import finetune as finetune_app
from mmd_keras.app import inputs
from mmd_keras.errors import ParameterError

FASHION = ["--flagfile=configs/fashion_mnist.cfg"]


def _configuration_error(main_module, *flags):
  """The message, with flag names, of the ParameterError that building the configuration of the
  Fashion-MNIST flagfile plus `flags` raises."""
  main_module._parse_flags(["main.py", *FASHION, *flags])
  with pytest.raises(ParameterError) as caught:
    main_module.configuration()
  return caught.value.message(main_module.flag_of)

def _values(**overrides):
  """The {field: value} mapping of the Fashion-MNIST flagfile, as main.py builds it."""
  import main
  main.FLAGS.unparse_flags()
  main.FLAGS(["main.py", "--flagfile=configs/fashion_mnist.cfg"])
  values = {s.field: main.FLAGS[s.flag].value for s in settings.SETTINGS}
  main.FLAGS.unparse_flags()
  values.update(overrides)
  return values


def _flag_message(main_module, argv, error):
  """How main.py spells `error` after parsing `argv`."""
  main_module._parse_flags(["main.py", *argv])
  return error.message(main_module.flag_of)


def test_parameter_error_renders_value_refs_and_renames():
  error = ParameterError("num_steps", "(K) must be in [1, 20] (T is {num_timesteps})", value=21,
                         refs=("num_timesteps",))
  assert str(error) == "num_steps=21 (K) must be in [1, 20] (T is num_timesteps)"
  with pytest.raises(ParameterError) as caught:
    with errors.renamed(num_steps="eval.steps", num_timesteps="diffusion.num_timesteps"):
      raise error
  assert caught.value.message(lambda f: f"<{f}>") == (
      "<eval.steps>=21 (K) must be in [1, 20] (T is <diffusion.num_timesteps>)")
  # Braces of values (a dict, a set) are not placeholders.
  assert str(ParameterError("x", "got {'a': 1}", value=[1, 2])) == "x=1,2 got {'a': 1}"


def test_build_resolves_defaults(monkeypatch, repo_root):
  monkeypatch.chdir(repo_root)
  cfg = config_lib.build(_values())
  assert (cfg.data.image_size, cfg.data.channels) == (28, 1)
  assert cfg.unet.ch_mult == (1, 2, 2) and cfg.unet.attn_resolutions == (7,)
  assert cfg.finetune.batch_size == cfg.data.batch_size == 64  # --finetune_batch_size unset.
  assert cfg.eval.steps == (5, 10, 20, 50, 100)
  assert cfg.eval.feature_nets == ("classifier", "classifier_heldout", "efficientnet_lite0")
  assert cfg.sampler.sampler == "dpm_solver_pp"
  assert cfg.eval.samplers == (("ddim", "uniform"), ("ddim", "trailing"),
                              ("dpm_solver_pp", "uniform"), ("dpm_solver_pp", "trailing"))
  assert cfg.features.classifier_path.endswith("pretrained/fashion_mnist/classifier.weights.h5")
  assert cfg.features.classifier_path_of("classifier_heldout").endswith(
      "pretrained/fashion_mnist/classifier_heldout.weights.h5")
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.finetune.learning_rate = 1.0
  unet = cfg.unet.factory()()
  assert (unet.image_size, unet.channels) == (28, 1)


@pytest.mark.parametrize("overrides, field", [
    ({"finetune.learning_rate": 0.0}, "finetune.learning_rate"),
    ({"finetune.batch_size": 0}, "finetune.batch_size"),
    ({"sampler.num_steps": 1001}, "sampler.num_steps"),
    ({"sampler.eta": 1.5}, "sampler.eta"),
    ({"sampler.sampler": "plms"}, "sampler.sampler"),
    ({"sampler.sampler": "dpm_solver_pp", "sampler.eta": 0.5}, "sampler.eta"),
    ({"unet.ch_mult": ["1", "x"]}, "unet.ch_mult"),
    ({"data.image_size": 30}, "data.image_size"),
    ({"data.dataset": "mnist"}, "data.dataset"),
    ({"diffusion.beta_start": 0.5}, "diffusion.beta_start"),
    ({"eval.steps": ["5", "5"]}, "eval.steps"),
    ({"eval.finetuned_checkpoints": ["5"]}, "eval.finetuned_checkpoints"),
    ({"eval.samplers": ["plms:uniform"]}, "eval.samplers"),
    ({"eval.samplers": ["ddim:cosine"]}, "eval.samplers"),
    ({"eval.samplers": ["ddim"]}, "eval.samplers"),
    ({"eval.samplers": ["ddim:trailing", "ddim:trailing"]}, "eval.samplers"),
    ({"export.model_version": 0}, "export.model_version"),
    ({"distribution.num_cpu_devices": 2}, "distribution.num_cpu_devices"),
    ({"run.workdir": "gs://bucket/run"}, "run.workdir"),
])
def test_build_names_the_field(monkeypatch, repo_root, overrides, field):
  monkeypatch.chdir(repo_root)
  with pytest.raises(ParameterError) as caught:
    config_lib.build(_values(**overrides))
  assert caught.value.parameter == field


def test_a_batch_of_one_is_refused_by_finetuning_only(main_module, monkeypatch, repo_root):
  monkeypatch.chdir(repo_root)
  main_module._parse_flags(["main.py", *FASHION, "--batch_size=1"])
  cfg = main_module.configuration()  # A valid pretraining batch.
  with pytest.raises(ParameterError) as caught:
    finetune_app.check(cfg)
  assert caught.value.message(main_module.flag_of).startswith("--batch_size=1 must be >= 2 ")


def test_finetune_batch_errors_name_the_flag_that_set_it(main_module, monkeypatch, repo_root):
  monkeypatch.chdir(repo_root)
  error = ParameterError("finetune.batch_size", "must be >= 2", value=1)
  assert _flag_message(main_module, FASHION, error).startswith("--batch_size=1 ")
  main_module.FLAGS.unparse_flags()
  assert _flag_message(main_module, [*FASHION, "--finetune_batch_size=1"],
                       error).startswith("--finetune_batch_size=1 ")


def test_data_errors_name_the_batch_field_of_the_caller(main_module, monkeypatch, repo_root):
  """data.make_dataset knows only `global_batch_size`; the finetune's stream says which field (and
  so which flag) supplied it."""
  monkeypatch.chdir(repo_root)
  main_module._parse_flags(["main.py", *FASHION, "--finetune_batch_size=8"])
  cfg = main_module.configuration()
  with pytest.raises(ParameterError) as caught:
    inputs.training_data(cfg, batch_size=0, batch_field="finetune.batch_size")
  assert caught.value.message(main_module.flag_of).startswith("--finetune_batch_size=0 ")
  with pytest.raises(ParameterError) as caught:
    data_lib.make_dataset(dataset="fashion_mnist", global_batch_size=0)
  assert caught.value.parameter == "global_batch_size"  # The library names its own parameter.


@pytest.mark.parametrize("field, flag", [("eval.num_images", "--num_eval_images"),
                                         ("eval.quickstart_images", "--quickstart_eval_images")])
def test_sample_count_errors_name_the_mode_s_flag(main_module, monkeypatch, repo_root, field,
                                                  flag):
  monkeypatch.chdir(repo_root)
  main_module._parse_flags(["main.py", *FASHION])
  with pytest.raises(ParameterError) as caught:
    with errors.renamed(num_images=field):
      metrics.check_enough_samples(100, 128)
  assert caught.value.message(main_module.flag_of).startswith(f"{flag}=100 ")


@pytest.mark.parametrize("timesteps, expected", [
    ("trailing", "trailing"), ("uniform", "uniform"),
    ("0, 300,600,800,999", (0, 300, 600, 800, 999))])
def test_timesteps_flag_takes_a_spacing_or_the_timesteps(monkeypatch, repo_root, timesteps,
                                                         expected):
  monkeypatch.chdir(repo_root)
  cfg = config_lib.build(_values(**{"sampler.timesteps": timesteps}))
  assert cfg.sampler.timesteps == expected
  assert len(cfg.timesteps(cfg.sampler.num_steps)) == 5


@pytest.mark.parametrize("timesteps, message", [
    ("cosine", "--timesteps=cosine must be one of uniform|trailing|linspace|quadratic"),
    ("1,2,x", "--timesteps=1,2,x must be one of"),
    ("1,2,3", "--timesteps=1,2,3 lists 3 timesteps; expected K=5 (--num_steps)"),
    ("0,1,2,3,1000", r"--timesteps=0,1,2,3,1000 must lie in [0, 999]"),
    ("0,1,2,3,3", "--timesteps=0,1,2,3,3 must be strictly increasing"),
])
def test_bad_timesteps_name_the_flag(main_module, monkeypatch, repo_root, timesteps, message):
  monkeypatch.chdir(repo_root)
  assert _configuration_error(main_module, f"--timesteps={timesteps}").startswith(message)


def test_sampler_flag_selects_the_sampler(monkeypatch, repo_root):
  monkeypatch.chdir(repo_root)
  assert config_lib.build(_values()).sampler.sampler == "dpm_solver_pp"  # The flagfile's.
  cfg = config_lib.build(_values(**{"sampler.sampler": "ddim"}))
  assert cfg.sampler.sampler == "ddim"


def test_eta_with_dpm_solver_pp_names_both_flags(main_module, monkeypatch, repo_root):
  monkeypatch.chdir(repo_root)
  assert _configuration_error(main_module, "--sampler=dpm_solver_pp", "--eta=0.5") == (
      "--eta=0.5 must be 0 with --sampler=dpm_solver_pp: it is deterministic")


def test_eval_samplers_flag_lists_sampler_and_spacing_pairs(monkeypatch, repo_root):
  monkeypatch.chdir(repo_root)
  assert config_lib.build(_values(**{"eval.samplers": []})).eval.samplers == ()
  cfg = config_lib.build(_values(**{"eval.samplers": ["ddim:uniform", " dpm_solver_pp : trailing",
                                                      ""], "sampler.sampler": "ddim"}))
  assert cfg.eval.samplers == (("ddim", "uniform"), ("dpm_solver_pp", "trailing"))
  # --sampler=ddim --timesteps=uniform: the base model's own rows are already those of ddim:uniform.
  assert evaluate_app.extra_samplers(cfg) == (("dpm_solver_pp", "trailing"),)
  assert evaluate_app.sampler_label("dpm_solver_pp", "trailing") == "DPM-Solver++ (trailing)"
  # Modes that run no evaluation take any η: the evaluating modes check the entries against it.
  cfg = config_lib.build(_values(**{"sampler.eta": 0.5, "sampler.sampler": "ddim",
                                    "eval.samplers": ["dpm_solver_pp:trailing"]}))
  assert (cfg.sampler.eta, cfg.eval.samplers) == (0.5, (("dpm_solver_pp", "trailing"),))


@pytest.mark.parametrize("entries, message", [
    ("ddim:trailing,plms:uniform",
     "--eval_samplers entry 'plms:uniform': the sampler must be one of ddim|dpm_solver_pp"),
    ("ddim:cosine", "--eval_samplers entry 'ddim:cosine': the spacing must be one of "
                    "uniform|trailing|linspace|quadratic (explicit timesteps only through "
                    "--timesteps)"),
    ("dpm_solver_pp", "--eval_samplers entries must look like <sampler>:<spacing> (e.g. "
                      "dpm_solver_pp:trailing), got 'dpm_solver_pp'"),
    ("ddim:trailing,ddim:trailing", "--eval_samplers lists ddim:trailing more than once"),
])
def test_bad_eval_samplers_name_the_flag(main_module, monkeypatch, repo_root, entries, message):
  monkeypatch.chdir(repo_root)
  assert _configuration_error(main_module, f"--eval_samplers={entries}") == message


@pytest.mark.parametrize("flags, message", [
    (["--real_batch_size=1"], "--real_batch_size=1 must be >= 2 "),
    (["--finetune_batch_size=8", "--micro_batches=3"],
     "--micro_batches=3 must divide each replica's generated batch (--finetune_batch_size=8 over 1"),
    (["--micro_batches=0"], "--micro_batches=0 must be > 0"),
])
def test_real_batch_and_micro_batches_are_checked_before_any_work(main_module, monkeypatch,
                                                                  repo_root, flags, message):
  monkeypatch.chdir(repo_root)
  main_module._parse_flags(["main.py", *FASHION, "--mode=finetune", *flags])
  with pytest.raises(ParameterError) as caught:
    finetune_app.check(main_module.configuration())
  assert caught.value.message(main_module.flag_of).startswith(message)


def test_the_real_batch_falls_back_on_the_finetune_batch(main_module, monkeypatch, repo_root):
  monkeypatch.chdir(repo_root)
  main_module._parse_flags(["main.py", *FASHION, "--finetune_batch_size=16"])
  assert main_module.configuration().finetune.real_batch_size == 16
  main_module.FLAGS.unparse_flags()
  main_module._parse_flags(["main.py", *FASHION, "--real_batch_size=256"])
  cfg = main_module.configuration()
  assert (cfg.finetune.real_batch_size, cfg.finetune.batch_size) == (256, 64)
