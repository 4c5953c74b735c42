"""Dataset-scale explanations for CNN image classifiers.

From a notebook, every explanation method is one call on plain tensors, and every stage one call::

    import pipeline
    maps = pipeline.explain(model, x, "gradcam_plusplus")             # (B, H, W), predicted classes
    maps = pipeline.explain(model, x, "integrated_gradients", target=3, steps=64)
    summary = pipeline.run(["stage=extract", "model=efficientnet_lite0", "data=photos"])
    bundle = pipeline.load_model("efficientnet_lite0")                # module, transform, class names
    store = pipeline.ActivationStore.open(summary["stages"]["extract"]["store"], bundle.key)
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import OmegaConf

__version__ = "0.1.0"

# conf/hydra/launcher/slurm.yaml: a GPU per node only when the run asks for device=cuda.
OmegaConf.register_new_resolver("slurm_gpus", lambda device: 1 if str(device) == "cuda" else 0, replace=True)
# faiss logs every CPU-feature probe of its loader at INFO: not the user's business
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


__all__ = ["explain", "run", "load_model", "load_dataset", "ActivationStore", "__version__"]
_LAZY = {"run": "pipeline.api", "load_model": "pipeline.api", "load_dataset": "pipeline.api",
         "ActivationStore": "pipeline.store"}


def __getattr__(name: str) -> Any:
    """The API's heavier parts, imported on first use (``import pipeline`` stays light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def explain(model: Any, x: Any, method: str, target: Any = None, layer: str | None = None, **settings: Any) -> Any:
    """Maps (B,H,W) of ``method`` (a name from :data:`pipeline.methods.registry.METHODS`) for the
    images ``x`` (B,C,H,W) on any ``nn.Module``: the same code the explain stage runs, no config or
    files. ``target`` is one class for all images, one per image, or None for each image's
    predicted class; ``layer`` the layer of a layer method (Grad-CAM, CAM, ...; default: the one the
    model's head reads); ``settings`` the method's other settings (as in ``explain.<method>``)."""
    import torch

    from pipeline.methods.hooks import channel_mismatch, check_images
    from pipeline.methods.registry import make_method

    x = check_images(x)
    if layer is not None:
        settings = {**settings, "layer": layer}
    model.eval()
    try:
        if target is None:
            with torch.no_grad():
                target = model(x).argmax(1)
        return make_method(method, settings).prepare(model, x[:1]).attribute(model, x, target).maps
    except RuntimeError as err:
        mismatch = channel_mismatch(model, x)
        if mismatch is not None:
            raise mismatch from err
        raise


__all__ = ["explain"]
