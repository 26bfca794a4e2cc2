"""The one declaration of every setting: flags generated from it, the configuration's fields filled
from it, its parsers and rules, and its default written nowhere else."""

import ast
import dataclasses
import pathlib

import pytest

from helpers import REPO_ROOT
from mmd_keras import config as config_lib
from mmd_keras import setting_rules
from mmd_keras import settings
from mmd_keras.errors import UserError


def test_every_field_is_a_setting_or_derived_and_every_setting_a_field():
  fields = {f"{section}.{f.name}" for section, cls in config_lib.SECTIONS.items()
            for f in dataclasses.fields(cls)}
  declared = {s.field for s in settings.SETTINGS if s.section != "merge"}
  assert fields - set(config_lib.DERIVED) == declared
  assert len(settings.BY_FLAG) == len(settings.BY_FIELD) == len(settings.SETTINGS)
  assert {s.section for s in settings.SETTINGS} <= set(settings.SECTIONS)


def test_main_defines_exactly_the_declared_flags(main_module):
  flags = main_module.FLAGS
  ours = {name for name in flags if flags.find_module_defining_flag(name, "").endswith(
      " settings")}
  assert ours == set(settings.BY_FLAG)
  for setting in settings.SETTINGS:
    flag = flags[setting.flag]
    assert flag.help.endswith(setting.help)  # An enum's help starts with its choices.
    default = flag.default
    if setting.kind == "list":
      default = ",".join(default) if default is not None else None
    assert default == setting.default, setting.flag


def test_flag_name_spells_the_flag_that_supplied_the_value():
  assert settings.flag_name("finetune.learning_rate") == "--learning_rate"
  # finetune.batch_size falls back on --batch_size while --finetune_batch_size is unset.
  assert settings.flag_name("finetune.batch_size") == "--batch_size"
  assert settings.flag_name("finetune.batch_size",
                            is_set=lambda flag: flag == "finetune_batch_size") == (
                                "--finetune_batch_size")
  assert settings.flag_name("global_batch_size") == "global_batch_size"  # Not a field.


def test_parsed_values_check_each_rule_once_and_fill_fallbacks():
  raw = {"data.batch_size": 32, "finetune.batch_size": None, "finetune.learning_rate": 1e-5,
         "unet.ch_mult": ["1", "2"], "finetune.rbf_bandwidths": ["0.5", "2"]}
  values = settings.parsed_values(raw)
  assert values["finetune.batch_size"] == 32
  assert values["unet.ch_mult"] == (1, 2) and values["finetune.rbf_bandwidths"] == (0.5, 2.0)
  for field, value, detail in [("finetune.learning_rate", 0.0, "must be > 0"),
                               ("finetune.learning_rate", float("nan"), "must be > 0"),
                               ("finetune.grad_clip", -1.0, "must be >= 0 (0 disables clipping)"),
                               ("sampler.eta", 1.5, "must be in [0, 1]"),
                               ("unet.dropout", 1.0, "must be in [0, 1)"),
                               ("export.model_version", 0, "must be >= 1 (TF Serving versions)"),
                               ("run.workdir", "gs://b/run", "is a remote (scheme://) path")]:
    with pytest.raises(UserError) as caught:
      settings.parsed_values({field: value})
    assert caught.value.parameter == field and caught.value.detail.startswith(detail)


@pytest.mark.parametrize("value, message", [
    ("", "is empty"), ("5,x", "list of integers"), ("5,0", ">= 1"), (",", "is empty"),
    ("5,10,5", "K=5 more than once")])
def test_step_budgets_errors(value, message):
  with pytest.raises(UserError, match=message) as caught:
    setting_rules.step_budgets("eval.steps", value)
  assert caught.value.parameter == "eval.steps"


def test_step_budgets():
  assert setting_rules.step_budgets("eval.steps", "5, 10,20") == (5, 10, 20)
  assert setting_rules.step_budgets("eval.steps", ["5", "100"]) == (5, 100)


def _literal_defaults(path):
  """(name, value, line) of every parameter default and class-level field value written as a
  literal in the Python file `path`."""
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    pairs = []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      args = node.args
      positional = args.posonlyargs + args.args
      pairs += zip(positional[len(positional) - len(args.defaults):], args.defaults)
      pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
      pairs = [(a.arg, d) for a, d in pairs]
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
      pairs.append((node.target.id, node.value))
    for name, default in pairs:
      try:
        yield name, ast.literal_eval(default), default.lineno
      except ValueError:
        pass


def _neutral(value):
  """Off, zero, nothing and names (False, 0, None, "ddim"): a function's plain case, which it may
  default to. Numbers and shapes are what a setting decides, and are written once."""
  return (value is None or isinstance(value, (bool, str)) or
          (isinstance(value, (int, float)) and value in (0, 1)))


def test_every_default_is_written_once():
  """No function parameter or dataclass field named like a setting (its field, flag or library
  name) repeats the setting's default as a literal: the declaration, or the library constant it
  names, is the only place."""
  sources = [path for pattern in ("main.py", "mmd_keras/**/*.py", "export/*.py", "scripts/*.py")
             for path in pathlib.Path(REPO_ROOT).glob(pattern)
             if path.name != "settings.py"]
  assert len(sources) > 40
  by_name = {}
  for setting in settings.SETTINGS:
    for name in {setting.name, setting.flag, *setting.library}:
      by_name.setdefault(name, []).append(setting)
  repeats = []
  for path in sources:
    application = "app" in path.parts or path.name in ("main.py", "config.py", "provenance.py")
    for name, value, line in _literal_defaults(path):
      for setting in by_name.get(name, ()):
        declared = settings.default(setting.field)
        if isinstance(value, list):
          value = tuple(value)
        if declared is not None and value == declared and type(value) is type(declared) and (
            application or not _neutral(value)):
          repeats.append(f"{path.relative_to(REPO_ROOT)}:{line} {name}={value!r} "
                         f"({setting.field})")
  assert not repeats, repeats
