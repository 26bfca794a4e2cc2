"""Exporting the fixed-K sampler: the serving tf.Module and its SavedModel/TFLite writers."""
