"""Occlusion sensitivity: slide a patch over the image, replace it by a fill, record the target's
score.

Patch positions mirror Captum's ``Occlusion`` exactly (first window at 0, ``ceil((n - w) / s) + 1``
steps per axis, the last window clipped at the edge), and the pixel-level maps average every window
covering a pixel, which is Captum's attribution for the score drop. All positions are evaluated in
batches by an *engine*: a callable ``(boxes (b, 4), fill (1, C, H, W)) -> logits (b, K)`` that
returns the logits of the image occluded at those boxes. The default engine builds the occluded
batch and runs the model; ``pipeline.methods.krypton`` provides incremental engines that reuse the
full image's activations (names ``"incremental"`` and ``"approximate"``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import PipelineError, suggest
from pipeline.methods.base import Explanation, MapMethod
from pipeline.methods.hooks import Target, check_target

Engine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FILLS = ("constant", "mean", "blur")
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


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """An int or a (h, w) pair as a pair of ints, or a PipelineError naming ``name``."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise PipelineError(f"Occlusion {name} must be an int or a pair of ints, got {value!r}.")
    return pair  # type: ignore[return-value]


def _axis_starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis, as Captum: ceil((size - window) / stride) + 1 steps from 0."""
    steps = math.ceil((size - window) / stride) + 1
    return [i * stride for i in range(steps)]


def occlusion_boxes(height: int, width: int, window: int | tuple[int, int],
                    stride: int | tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch boxes (P, 4) as (y0, x0, y1, x1), row-major, and the grid shape (gh, gw).

    Raises a PipelineError for a non-positive window or stride, a window larger than the image,
    or a stride larger than the window (pixels between windows would never be occluded).
    """
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
    if wh <= 0 or ww <= 0:
        raise PipelineError(f"Occlusion window must be positive, got {(wh, ww)}. Fix: use a window "
                            "of at least 1 pixel, e.g. occlusion.window=16.")
    if sh <= 0 or sw <= 0:
        raise PipelineError(f"Occlusion stride must be positive, got {(sh, sw)}. Fix: use a stride "
                            "between 1 and the window size, e.g. occlusion.stride=8.")
    if wh > height or ww > width:
        raise PipelineError(
            f"Occlusion window {(wh, ww)} is larger than the image ({height}x{width}). Fix: use a "
            f"window of at most {min(height, width)} pixels.")
    for s, w, n, axis in ((sh, wh, height, "height"), (sw, ww, width, "width")):
        if s > w and w < n:
            raise PipelineError(
                f"Occlusion stride {s} is larger than the window {w} along the {axis}, so some "
                "pixels would never be occluded. Fix: use a stride no larger than the window.")
    ys = torch.tensor(_axis_starts(height, wh, sh), dtype=torch.long)
    xs = torch.tensor(_axis_starts(width, ww, sw), dtype=torch.long)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    y0, x0 = gy.reshape(-1), gx.reshape(-1)
    boxes = torch.stack([y0, x0, (y0 + wh).clamp(max=height), (x0 + ww).clamp(max=width)], dim=1)
    return boxes, (len(ys), len(xs))


def box_masks(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (P, H) and column (P, W) indicator masks of the boxes; their outer product is the box."""
    rows = torch.arange(height)
    cols = torch.arange(width)
    row_mask = (rows[None] >= boxes[:, 0:1]) & (rows[None] < boxes[:, 2:3])
    col_mask = (cols[None] >= boxes[:, 1:2]) & (cols[None] < boxes[:, 3:4])
    return row_mask, col_mask


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflect padding, kernel radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3.0 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    # Reflect padding needs pad < size; replicate beyond that keeps tiny images working.
    mode = "reflect" if radius < min(x.shape[-2:]) else "replicate"
    out = F.pad(x, (radius, radius, 0, 0), mode=mode)
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode=mode)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def make_fill(x: torch.Tensor, fill: str = "constant", fill_value: float = 0.0,
              blur_sigma: float = 5.0) -> torch.Tensor:
    """The (1, C, H, W) image whose pixels replace the patch: a constant, the per-channel mean of
    ``x``, or a Gaussian-blurred copy of ``x``."""
    if fill == "constant":
        return torch.full_like(x, float(fill_value))
    if fill == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if fill == "blur":
        if not blur_sigma > 0:
            raise PipelineError(f"Occlusion blur_sigma must be positive, got {blur_sigma}. "
                                "Fix: use e.g. blur_sigma=5.0.")
        return gaussian_blur(x, float(blur_sigma))
    raise PipelineError(f"Unknown occlusion fill '{fill}'.{suggest(fill, FILLS)} "
                        f"Fix: use one of {', '.join(FILLS)}.")


def occlude(x: torch.Tensor, fill: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The batch (b, C, H, W) of ``x`` with each box replaced by ``fill``'s pixels."""
    row_mask, col_mask = box_masks(boxes, x.shape[-2], x.shape[-1])
    mask = (row_mask[:, :, None] & col_mask[:, None, :]).unsqueeze(1)
    return torch.where(mask, fill, x)


class PlainEngine:
    """Runs the model on the occluded batch: the reference every faster engine must match."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model = model
        self.x = x

    @torch.no_grad()
    def __call__(self, boxes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return self.model(occlude(self.x, fill, boxes))


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
        from pipeline.methods.krypton import IncrementalEngine
        return IncrementalEngine(model, x)
    if engine == "approximate":
        from pipeline.methods.krypton import ApproximateEngine
        for name in options:
            if name not in ApproximateEngine.DEFAULTS:
                raise PipelineError(
                    f"Unknown approximate-occlusion option '{name}'."
                    f"{suggest(name, ApproximateEngine.DEFAULTS)} Fix: use "
                    f"{', '.join(ApproximateEngine.DEFAULTS)}.")
        return ApproximateEngine(model, x, **options)
    raise PipelineError(f"Unknown occlusion engine '{engine}'.{suggest(str(engine), ENGINES)} "
                        f"Fix: use one of {', '.join(ENGINES)} or pass a callable.")


def window_average(grid_values: torch.Tensor, boxes: torch.Tensor, height: int,
                   width: int) -> torch.Tensor:
    """(H, W) map where each pixel is the mean of the values of the windows covering it (0 where
    none does). Accumulates in float64 so the result matches Captum's running sums closely."""
    row_mask, col_mask = box_masks(boxes, height, width)
    rm, cm = row_mask.double(), col_mask.double()
    values = grid_values.reshape(-1).double()
    total = torch.einsum("p,ph,pw->hw", values, rm, cm)
    count = torch.einsum("ph,pw->hw", rm, cm)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0).float()


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
            from pipeline.methods.krypton import ApproximateEngine, low_precision_active

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
