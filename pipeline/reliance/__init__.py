"""Is the model looking at the object? Per-class reliance over whole splits.

``summary``: per-class tables, flags and drift (pure pandas/numpy); ``robust``: the one rule for
"far from the other classes"; ``spray``: Spectral Relevance Analysis (strategies without
annotations); ``causal``: predictions on object-only and context-only variants; ``assess``: the
stage-side assessment that reads the map store and draws the flagged classes' figures.
"""
