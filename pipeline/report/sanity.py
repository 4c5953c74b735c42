"""Sanity checks of explanation methods (Adebayo et al. 2018) as the report runs and judges them.

:func:`check` runs the cascading model-parameter randomisation and the class check of
:mod:`pipeline.methods.sanity` for one method on a few images and reduces them to numbers;
:func:`verdict` applies the pass criteria:

* randomisation: after every listed layer is randomised (output side first), the mean Spearman
  rank correlation between the trained and the randomised model's maps is at most
  ``max_final_spearman``;
* class check: the mean Spearman between the maps for two different classes (the predicted and
  the second most likely) is at most ``max_class_spearman`` (1 - eps);
* input check (Kindermans et al. 2017): the mean Spearman between the maps of different images for
  the same target class (the first image's predicted class) is at most ``max_input_spearman``: a
  map that barely changes with the image shows the method or the network, not the image.

Images whose trained-model map is constant carry no ranking and are left out; a randomised or
second-class map that is constant shares no ranking with the original and counts as Spearman 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.methods.dependence import input_dependence
from pipeline.methods.sanity import cascading_randomization, relative_l2, spearman

Method = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _constant(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.detach().flatten(1)
    return (flat.amax(1) - flat.amin(1)) <= 0


def _rho(original: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Spearman per image; 0 where ``other`` is constant (no ranking shared with the original)."""
    r = spearman(original.float().cpu(), other.float().cpu())
    return torch.where(_constant(other).cpu(), torch.zeros_like(r), r)


def check(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, second: torch.Tensor, fn: Method,
          layers: Sequence[str] | None, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """Randomisation cascade, class check and input check of ``fn`` on images ``x``. Returns the
    numbers (JSON-able) and the first usable image's maps: the trained model's, then one after each
    step (S+1, H, W)."""
    original, steps = cascading_randomization(model, x, targets, fn, layers, seed)
    keep = ~_constant(original).cpu()
    other = fn(model, x, second).detach()
    same = fn(model, x, targets[:1].expand(len(x))).detach() if len(x) > 1 else original
    usable = same[~_constant(same)]
    per_step = [_rho(original, s.map)[keep] for s in steps]
    cls = _rho(original, other)[keep]
    l2 = relative_l2(original.cpu(), other.cpu())[keep]
    n = int(keep.sum())

    def mean(t: torch.Tensor) -> float:
        return float(t.double().mean()) if n else math.nan

    result = {"images": n, "dropped_constant": int((~keep).sum()), "layers": [s.layer for s in steps],
              "steps": [mean(r) for r in per_step], "steps_per_image": [r.tolist() for r in per_step],
              "class_spearman": mean(cls), "class_spearman_per_image": cls.tolist(), "class_rel_l2": mean(l2),
              "input_spearman": input_dependence(usable), "input_target": int(targets[0])}
    first = int(torch.nonzero(keep)[0]) if n else 0
    cascade = torch.stack([original[first], *[s.map[first] for s in steps]]).float().cpu().numpy()
    return result, cascade


def verdict(result: dict[str, Any], max_final_spearman: float, max_class_spearman: float,
            max_input_spearman: float) -> tuple[bool | None, bool | None, bool | None, str]:
    """(randomisation passed, class check passed, input check passed, reason); None where a check
    could not run (the input check needs two images with a non-constant map)."""
    if not result.get("images"):
        return None, None, None, "every trained-model map was constant: nothing to rank"
    final = result["steps"][-1] if result["steps"] else math.nan
    rand_ok = None if math.isnan(final) else final <= max_final_spearman
    cls = result["class_spearman"]
    class_ok = None if math.isnan(cls) else cls <= max_class_spearman
    same = float(result.get("input_spearman", math.nan))
    input_ok = None if math.isnan(same) else same <= max_input_spearman
    reasons = []
    if rand_ok is False:
        reasons.append(f"maps barely change when the model is randomised (final Spearman {final:.2f} > "
                       f"{max_final_spearman})")
    if class_ok is False:
        reasons.append(f"maps for two classes are nearly the same (Spearman {cls:.2f} > {max_class_spearman})")
    if input_ok is False:
        reasons.append(f"maps of different images for the same class are nearly the same (Spearman {same:.2f} > "
                       f"{max_input_spearman}): they do not depend on the image")
    return rand_ok, class_ok, input_ok, "; ".join(reasons)
