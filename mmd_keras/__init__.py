"""mmd_keras: MMD-DDM (Aiello et al. 2023) in TensorFlow 2 / Keras 3."""
