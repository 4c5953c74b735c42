"""Where a model comes from: the module in eval mode, its preprocessing, class names, layers, key."""

from pipeline.models.bundle import build_model
from pipeline.models.common import ModelBundle, weights_key

__all__ = ["ModelBundle", "build_model", "weights_key"]
