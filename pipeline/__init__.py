"""Dataset-scale explanations for CNN image classifiers.

From a notebook, every explanation method is one call on plain tensors::

    import pipeline
    maps = pipeline.explain(model, x, "gradcam_plusplus")             # (B, H, W), predicted classes
    maps = pipeline.explain(model, x, "integrated_gradients", target=3, steps=64)
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

__version__ = "0.1.0"

# conf/hydra/launcher/slurm.yaml: a GPU per node only when the run asks for device=cuda.
OmegaConf.register_new_resolver("slurm_gpus", lambda device: 1 if str(device) == "cuda" else 0, replace=True)


def explain(model: Any, x: Any, method: str, target: Any = None, **settings: Any) -> Any:
    """Maps (B,H,W) of ``method`` (a name from :data:`pipeline.methods.registry.METHODS`) for the
    images ``x`` (B,C,H,W) on ``model``: the same code the explain stage runs. ``target`` is one
    class for all images, one per image, or None for each image's predicted class; ``settings``
    are the method's settings (as in ``explain.<method>`` of the config)."""
    import torch

    from pipeline.methods.registry import make_method

    model.eval()
    if target is None:
        with torch.no_grad():
            target = model(x).argmax(1)
    return make_method(method, settings).prepare(model, x[:1]).attribute(model, x, target).maps


__all__ = ["explain"]
