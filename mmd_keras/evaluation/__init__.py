"""Evaluation: step-budget sweeps scored in several feature spaces (`sweep`), the reference set's
features (`reference`), reports (`report`) and merging reports over seeds (`merge`)."""

from mmd_keras import sampling
from mmd_keras.evaluation.merge import merge_reports
from mmd_keras.evaluation.reference import feature_cache_key
from mmd_keras.evaluation.reference import reference_features
from mmd_keras.evaluation.report import FINETUNED
from mmd_keras.evaluation.report import best_training_free
from mmd_keras.evaluation.report import learned_timesteps
from mmd_keras.evaluation.report import markdown_table
from mmd_keras.evaluation.report import plot_fid_vs_steps
from mmd_keras.evaluation.report import trained_space
from mmd_keras.evaluation.sweep import FeatureSpace
from mmd_keras.evaluation.sweep import ModelSpec
from mmd_keras.evaluation.sweep import label_slug
from mmd_keras.evaluation.sweep import run
from mmd_keras.evaluation.sweep import score

__all__ = ["sampling", "merge_reports", "feature_cache_key", "reference_features", "FINETUNED",
           "best_training_free", "learned_timesteps", "markdown_table", "plot_fid_vs_steps",
           "trained_space", "FeatureSpace", "ModelSpec", "label_slug", "run", "score"]
