"""The table of map methods: name -> class. Stages, the report, the sanity checks and the audit
find methods here and never branch on a method's name; adding a method is one module, one config
block (``conf/explain/default.yaml``) and one line below."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.errors import PipelineError, suggest
from pipeline.methods.base import MapMethod
from pipeline.methods.cam import CAM
from pipeline.methods.gradcam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pipeline.methods.guided import GuidedBackprop, GuidedGradCAM
from pipeline.methods.integrated_gradients import IntegratedGradients
from pipeline.methods.masking import RISE, AblationCAM, ScoreCAM
from pipeline.methods.occlusion import Occlusion
from pipeline.methods.saliency import InputXGradient, Saliency, SmoothGrad
from pipeline.methods.segmentation import Segmentation

METHODS: dict[str, type[MapMethod]] = {cls.name: cls for cls in (
    Saliency,
    SmoothGrad,
    InputXGradient,
    IntegratedGradients,
    Occlusion,
    CAM,
    GradCAM,
    GradCAMPlusPlus,
    XGradCAM,
    LayerCAM,
    HiResCAM,
    EigenCAM,
    ScoreCAM,
    AblationCAM,
    RISE,
    GuidedBackprop,
    GuidedGradCAM,
    Segmentation,
)}


def method_class(name: str) -> type[MapMethod]:
    """The class registered as ``name``, or an error suggesting the closest names."""
    if name not in METHODS:
        raise PipelineError(f"unknown explain method '{name}'.{suggest(name, METHODS)} "
                            f"Methods: {', '.join(METHODS)}.")
    return METHODS[name]


def make_method(name: str, settings: Mapping[str, Any] | None = None) -> MapMethod:
    """A new, unprepared instance of method ``name`` with ``settings`` (its config block)."""
    return method_class(name)(**dict(settings or {}))
