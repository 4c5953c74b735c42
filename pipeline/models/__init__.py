"""Where a model comes from: the module in eval mode, its preprocessing, class names, layers, key."""

from pipeline.models.bundle import ModelBundle, build_model, weights_key

__all__ = ["ModelBundle", "build_model", "weights_key"]
