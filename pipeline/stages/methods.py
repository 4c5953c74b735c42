"""stage=methods: list the registered map methods, their settings for this run, and whether each
applies to this run's model (checked on one of the dataset's images, before any real work)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.data.images import load_image
from pipeline.errors import PipelineError
from pipeline.methods.base import NotApplicable
from pipeline.methods.registry import METHODS, make_method
from pipeline.runtime import Context, show
from pipeline.settings import plain


def run(ctx: Context) -> dict[str, Any]:
    """Print and save the method table (name, what it does, settings, applies to the model or why not)."""
    model, ecfg = ctx.model, ctx.cfg.explain
    x0 = model.transform(load_image(ctx.dataset.records["path"].iloc[0]))[None].to(ctx.device)
    rows = []
    for name, cls in METHODS.items():
        try:
            method = make_method(name, plain(ecfg.get(name))).prepare(model.module.eval(), x0)
            applies, settings = "yes", method.key_settings()
        except NotApplicable as err:
            applies, settings = f"no: {err}", {}
        except PipelineError as err:
            applies, settings = f"settings: {err}", {}
        rows.append({"method": name, "what": cls.description, "applies": applies,
                     "settings": ", ".join(f"{k}={v}" for k, v in settings.items())})
    table = pd.DataFrame(rows)
    out = ctx.run_dir / "methods.csv"
    table.to_csv(out, index=False)
    with pd.option_context("display.max_colwidth", 90, "display.width", 250):
        show(table.to_string(index=False))
    return {"methods": len(rows), "applicable": int((table["applies"] == "yes").sum()), "table": str(out)}
