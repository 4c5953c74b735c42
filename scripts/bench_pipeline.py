"""Benchmark of the whole default pipeline: a fresh run (empty outputs: data generation, training,
extraction, explanations, visualisations, report) and a warm re-run (everything cached).

Merges ``pipeline_fresh_s`` and ``pipeline_warm_s`` into outputs/bench/report.json (other fields kept).

    python scripts/bench_pipeline.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(outputs: Path) -> float:
    """Wall seconds of ``python -m pipeline`` with outputs under ``outputs``; fails loudly on error."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", f"paths.outputs={outputs}", "progress=false"],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "report.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = timed_run(Path(tmp))
        warm = timed_run(Path(tmp))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.update({"pipeline_fresh_s": round(fresh, 1), "pipeline_warm_s": round(warm, 2),
                 "pipeline_fresh_target_s": 360, "pipeline_warm_target_s": 15})
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"pipeline_fresh_s": fresh, "pipeline_warm_s": warm}, indent=2))


if __name__ == "__main__":
    main()
