"""Occlusion sensitivity as one package: patches and fills (``patches``), the engine protocol and
the plain engine (``engines``), Krypton's incremental engine (``krypton``, with its box arithmetic
in ``regions`` and per-layer rules in ``rules``) and approximate engine (``approximate``), and the
sliding-window method on top of them (``sliding``). Imports point one way:
patches <- engines, regions, rules <- krypton <- approximate <- sliding."""

from pipeline.methods.execution import low_precision_active
from pipeline.methods.occlusion.engines import Engine, PlainEngine
from pipeline.methods.occlusion.approximate import ApproximateEngine
from pipeline.methods.occlusion.krypton import IncrementalEngine
from pipeline.methods.occlusion.patches import (FILLS, box_masks, make_fill, occlude,
                                                occlusion_boxes, window_average)
from pipeline.methods.occlusion.sliding import ENGINES, Occlusion, OcclusionResult, occlusion, resolve_engine

__all__ = ["ENGINES", "FILLS", "ApproximateEngine", "Engine", "IncrementalEngine", "Occlusion", "OcclusionResult",
           "PlainEngine", "box_masks", "low_precision_active", "make_fill", "occlude", "occlusion",
           "occlusion_boxes", "resolve_engine", "window_average"]
