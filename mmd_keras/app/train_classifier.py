"""--mode=train_classifier: trains the project's feature network on the dataset."""

from mmd_keras import classifier as classifier_lib
from mmd_keras import errors


def run(cfg):
  f = cfg.features
  with errors.renamed(arch="features.feature_net", out_path="features.classifier_path",
                      epochs="features.classifier_epochs", dataset="data.dataset",
                      data_dir="data.data_dir", global_batch_size="data.batch_size"):
    classifier_lib.train_classifier(
        arch=f.feature_net, dataset=cfg.data.dataset, data_dir=cfg.data.data_dir,
        image_size=cfg.data.image_size, epochs=f.classifier_epochs,
        batch_size=cfg.data.batch_size, seed=cfg.run.seed, out_path=f.classifier_path)
