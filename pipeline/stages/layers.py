"""stage=layers: list the model's addressable layers with their output shapes."""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.models.layers import layer_table
from pipeline.runtime import Context, show


def run(ctx: Context) -> dict[str, Any]:
    """Print and save the layer table (name, type, output shape, calls per forward pass)."""
    model = ctx.model
    rows = [{"layer": li.name, "type": li.type, "shape": "x".join(map(str, li.shape)) if li.shape else "",
             "calls": li.calls} for li in layer_table(model.module.cpu(), model.input_shape)]
    model.module.to(ctx.device)
    table = pd.DataFrame(rows)
    out = ctx.run_dir / "layers.csv"
    table.to_csv(out, index=False)
    show(table.to_string(index=False))
    result: dict[str, Any] = {"layers": len(rows), "table": str(out)}
    reused = [r["layer"] for r in rows if r["calls"] > 1]
    if reused:
        result["reused"] = reused
        show(f"note: {len(reused)} module(s) run more than once per forward pass ({', '.join(reused[:6])}"
             f"{', ...' if len(reused) > 6 else ''}); every stage reads such a layer at its first call. "
             "Pick the enclosing block for the output of a later call.")
    if not model.takes_hooks:
        result["note"] = ("no output shapes: they are measured with forward hooks, which TorchScript modules do "
                          "not take; export the model with torch.export and use model=exported to see them")
        show(f"note: {result['note']}")
    return result
