"""Occlusion sensitivity: slide a patch over the image, replace it by a fill, record the target's
score.

Patch positions mirror Captum's ``Occlusion`` exactly (first window at 0, ``ceil((n - w) / s) + 1``
steps per axis, the last window clipped at the edge), and the pixel-level maps average every window
covering a pixel, which is Captum's attribution for the score drop. All positions are evaluated in
batches by an *engine*: a callable ``(boxes (b, 4), fill (1, C, H, W)) -> logits (b, K)`` that
returns the logits of the image occluded at those boxes. The default engine builds the occluded
batch and runs the model; ``pipeline.methods.occlusion.krypton`` provides incremental engines that reuse the
full image's activations (names ``"incremental"`` and ``"approximate"``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError, suggest
from pipeline.methods.base import Explanation, MapMethod
from pipeline.methods.execution import low_precision_active
from pipeline.methods.hooks import Target, check_target
from pipeline.methods.occlusion.engines import Engine, PlainEngine
from pipeline.methods.occlusion.approximate import ApproximateEngine
from pipeline.methods.occlusion.krypton import IncrementalEngine
from pipeline.methods.occlusion.patches import FILLS, make_fill, occlusion_boxes, window_average

ENGINES = ("plain", "incremental", "approximate")


@dataclass
class OcclusionResult:
    """Occlusion maps for one image and one target class.

    ``score_drop_grid``/``prob_grid`` have one value per patch position (grid rows x columns);
    ``score_drop``/``prob`` are at the input's resolution, each pixel the mean over the windows
    that cover it. ``boxes`` holds the (y0, x0, y1, x1) window of each position in row-major order.
    """

    score_drop_grid: torch.Tensor
    prob_grid: torch.Tensor
    score_drop: torch.Tensor
    prob: torch.Tensor
    base_score: float
    base_prob: float
    boxes: torch.Tensor


def resolve_engine(engine: str | Engine | None, model: nn.Module, x: torch.Tensor,
                   **options: float) -> Engine:
    """An engine callable from a name ("plain", "incremental", "approximate"), a callable or None.

    ``options`` go to the approximate engine (``tolerance``, ``tau``, ``low_precision``).
    """
    if options and engine != "approximate":
        raise PipelineError(f"Occlusion options {sorted(options)} apply only to "
                            "engine='approximate'. Fix: drop them or use engine='approximate'.")
    if engine is None or engine == "plain":
        return PlainEngine(model, x)
    if callable(engine):
        return engine
    if engine == "incremental":
        return IncrementalEngine(model, x)
    if engine == "approximate":
        for name in options:
            if name not in ApproximateEngine.DEFAULTS:
                raise PipelineError(
                    f"Unknown approximate-occlusion option '{name}'."
                    f"{suggest(name, ApproximateEngine.DEFAULTS)} Fix: use "
                    f"{', '.join(ApproximateEngine.DEFAULTS)}.")
        return ApproximateEngine(model, x, **options)
    raise PipelineError(f"Unknown occlusion engine '{engine}'.{suggest(str(engine), ENGINES)} "
                        f"Fix: use one of {', '.join(ENGINES)} or pass a callable.")


@torch.no_grad()
def occlusion(model: nn.Module, x: torch.Tensor, target: int,
              window: int | tuple[int, int] = 16, stride: int | tuple[int, int] = 8,
              fill: str = "constant", fill_value: float = 0.0, blur_sigma: float = 5.0,
              batch_size: int = 64, engine: str | Engine | None = None,
              **engine_options: float) -> OcclusionResult:
    """Occlusion maps of ``model`` for image ``x`` (1, C, H, W) and class ``target``.

    ``engine`` is "plain" (default), "incremental" (exact, Krypton), "approximate" (adaptive
    drill-down, Krypton's projective-field threshold and a bfloat16 change path;
    ``engine_options`` tune it) or a callable ``(boxes, fill) -> logits``. An engine with a
    ``grid_logits`` method gets the whole grid at once: the approximate engine chooses which
    positions to evaluate, the incremental one works out every position's changed boxes once.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise PipelineError(f"Occlusion takes one image shaped (1, C, H, W), got {tuple(x.shape)}. "
                            "Fix: pass x[i:i+1] for a batch.")
    if batch_size < 1:
        raise PipelineError(f"Occlusion batch_size must be at least 1, got {batch_size}.")
    height, width = x.shape[-2:]
    boxes, grid = occlusion_boxes(height, width, window, stride)
    base_logits = model(x)
    num_classes = base_logits.shape[1]
    try:
        index = operator.index(target)
    except TypeError:
        index = -1
    if not 0 <= index < num_classes:
        raise PipelineError(f"Target class {target!r} is out of range for a model with "
                            f"{num_classes} outputs. Fix: use a class index in "
                            f"0..{num_classes - 1}.")
    target = index
    fill_image = make_fill(x, fill, fill_value, blur_sigma)
    run = resolve_engine(engine, model, x, **engine_options)
    grid_logits = getattr(run, "grid_logits", None)
    if grid_logits is not None:
        logits = grid_logits(boxes, grid, fill_image, target, batch_size)
    else:
        logits = torch.cat([run(boxes[i:i + batch_size], fill_image)
                            for i in range(0, len(boxes), batch_size)])
    base_score = base_logits[0, target]
    scores = logits[:, target]
    probs = torch.softmax(logits.float(), dim=1)[:, target]
    score_drop_grid = (base_score - scores).reshape(grid)
    prob_grid = probs.reshape(grid)
    return OcclusionResult(
        score_drop_grid=score_drop_grid,
        prob_grid=prob_grid,
        score_drop=window_average(score_drop_grid, boxes, height, width),
        prob=window_average(prob_grid, boxes, height, width),
        base_score=float(base_score),
        base_prob=float(torch.softmax(base_logits.float(), dim=1)[0, target]),
        boxes=boxes,
    )


class Occlusion(MapMethod):
    """Occlusion sensitivity of each image in the batch: the target logit's drop averaged over the
    windows covering each pixel; the probability map and the per-position grids are extras."""

    name = "occlusion"
    DEFAULTS = {"window": 16, "stride": 8, "fill": "constant", "fill_value": 0.0, "blur_sigma": 5.0,
                "engine": "incremental", "approximate": {}}
    OPTIONS = {"batch_size": 64}
    many_passes = True
    description = "score drop when a sliding patch is filled (Zeiler & Fergus 2014)"

    def validate(self) -> None:
        self._positive("window", "stride")
        self._positive("batch_size", store=self.options)
        self._choice("fill", FILLS)
        self._choice("engine", ENGINES)
        self.settings["fill_value"] = float(self.settings["fill_value"])
        self.settings["blur_sigma"] = float(self.settings["blur_sigma"])
        self.settings["approximate"] = dict(self.settings["approximate"] or {})
        self.low_precision = False

    def prepare(self, model: nn.Module, x0: torch.Tensor, env: Any = None) -> MapMethod:
        super().prepare(model, x0, env)
        if self.settings["engine"] == "approximate":
            wanted = self.settings["approximate"].get("low_precision", ApproximateEngine.DEFAULTS["low_precision"])
            self.low_precision = bool(wanted) and low_precision_active(x0.device)
        return self

    def key_settings(self) -> dict[str, Any]:
        s = self.settings
        key: dict[str, Any] = {"window": s["window"], "stride": s["stride"], "fill": s["fill"]}
        if s["fill"] == "constant":
            key["fill_value"] = s["fill_value"]
        if s["fill"] == "blur":
            key["blur_sigma"] = s["blur_sigma"]
        # plain and incremental give the same maps; the approximate engine's settings change them,
        # and the bfloat16 change path runs only where it is native, so the key says whether it ran
        key["mode"] = ({"approximate": {**s["approximate"], "low_precision": self.low_precision}}
                       if s["engine"] == "approximate" else "exact")
        return key

    def attribute(self, model: nn.Module, x: torch.Tensor, target: Target) -> Explanation:
        s = self.settings
        with torch.no_grad():
            t = check_target(target, model(x[:1]).shape[1], x.shape[0])
        maps, probs, grid_drop, grid_prob, meta = [], [], [], [], []
        options = s["approximate"] if s["engine"] == "approximate" else {}
        for i in range(x.shape[0]):
            xi = x[i:i + 1]
            engine = resolve_engine(s["engine"], model, xi, **options)
            used = "plain (fallback, see log)" if getattr(engine, "graph", True) is None else s["engine"]
            res = occlusion(model, xi, int(t[i]), window=s["window"], stride=s["stride"], fill=s["fill"],
                            fill_value=s["fill_value"], blur_sigma=s["blur_sigma"],
                            batch_size=self.options["batch_size"], engine=engine)
            maps.append(res.score_drop)
            probs.append(res.prob)
            grid_drop.append(res.score_drop_grid)
            grid_prob.append(res.prob_grid)
            meta.append({"engine": s["engine"], "engine_used": used, "base_score": res.base_score,
                         "base_prob": res.base_prob, "positions": int(res.boxes.shape[0]),
                         "map": "score drop (target logit) averaged over the windows covering each pixel"})
        return Explanation(torch.stack(maps), {"prob": torch.stack(probs), "grid_score_drop": torch.stack(grid_drop),
                                               "grid_prob": torch.stack(grid_prob)}, meta)
