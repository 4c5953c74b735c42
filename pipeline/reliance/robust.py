"""One robust rule for "this class is far from the others", shared by the reliance checks.

A class's value is compared with the *other* classes' values only (so a single extreme class does
not move its own reference): it is far below them when

    value < median(others) - max(k * 1.4826 * MAD(others), min_gap)

and far above them with the signs swapped. 1.4826 * MAD is the normal-consistent robust standard
deviation; ``min_gap`` keeps a tight cluster of classes (MAD near 0) from flagging tiny differences.
With fewer than ``min_classes`` other classes with a value nothing is flagged: there is no
reference to be far from.
"""

from __future__ import annotations

import numpy as np

MAD_SCALE = 1.4826


def describe_rule(k: float, min_gap: float, direction: str = "below") -> str:
    """The rule in words, for the config's users and the report."""
    sign = "-" if direction == "below" else "+"
    return (f"{direction} the median of the other classes {sign} max({k:g} x 1.4826 x their median absolute "
            f"deviation, {min_gap:g})")


def far_from_others(values: np.ndarray, k: float, min_gap: float, direction: str = "below",
                    min_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per class: (flagged bool, reference threshold) under the rule above; NaN values are never
    flagged and are left out of the other classes' reference."""
    if direction not in ("below", "above"):
        raise ValueError(f"direction must be 'below' or 'above', got {direction!r}")
    v = np.asarray(values, dtype=np.float64)
    flagged = np.zeros(len(v), dtype=bool)
    limits = np.full(len(v), np.nan)
    for i in range(len(v)):
        others = np.delete(v, i)
        others = others[np.isfinite(others)]
        if not np.isfinite(v[i]) or len(others) < min_classes:
            continue
        med = float(np.median(others))
        spread = max(k * MAD_SCALE * float(np.median(np.abs(others - med))), min_gap)
        limits[i] = med - spread if direction == "below" else med + spread
        flagged[i] = v[i] < limits[i] if direction == "below" else v[i] > limits[i]
    return flagged, limits
