"""Benchmark for stage=visualize: truncated vs full-network gradient ascent, and deconvnet throughput.

* Ascent: ``render`` for one channel of a middle block of EfficientNet-Lite0 (224x224, Lucid's
  standard transforms, Fourier parameterisation), once with the channel objective alone (the forward
  stops at the block: ``truncated_forward``) and once with ``channel + 0 * class_logit(0)``, which
  gives the same picture but makes every step run (and backpropagate through) the full network.
  The headline is the first of ``--layers`` (blocks.4, 28x28, the end of the 40-channel stage);
  the others (blocks.6, 14x14) are timed too and reported under ``details``. A render whose
  objective is the first conv measures the cost outside the network (Fourier parameterisation,
  transforms, optimiser): ``network_speedup`` is the ratio with that overhead taken out of both.
  Same process, same settings, alternating order per repeat; the best of the repeats is reported.
* Deconvnet: projections per second on batches of images, for digits_cnn (explicit and hooked)
  and EfficientNet-Lite0 (hooked; it has BatchNorm and residual blocks).
* Input dependence: ``stage=visualize visualize.projection=both`` through the pipeline, on the
  trained digits_cnn (its last conv block, clutter digits) and on EfficientNet-Lite0's ``head``
  (every scikit-image photo): the mean Spearman between the projections of a channel's different
  top images, aligned on the unit, for the deconvnet and guided backprop, and whether the stage
  flags each (``visualize.input_dependence.max_spearman``).

Writes ``outputs/bench/visualize.json`` with ``ascent_truncated_s``, ``ascent_full_s``,
``ascent_speedup``, ``deconv_images_per_s`` (EfficientNet-Lite0, hooked) and
``input_dependence_{deconv,guided}_{lite0,digits}``, plus details and the machine load (the 2 cores
are shared: compare ratios, not absolute times). ``--parts`` runs some of them; the fields of the
others are kept from the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.data.sources import PHOTO_NAMES
from pipeline.methods.ascent import channel, class_logit, render
from pipeline.methods.deconvnet import deconvnet, deconvnet_explicit
from pipeline.models.digits import DigitsCNN
from pipeline.models.efficientnet_lite import INPUT_SIZE, MEAN, STD, load_efficientnet_lite0

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench" / "visualize.json"
PARTS = ("ascent", "deconv", "dependence")


def time_render(model: torch.nn.Module, objective, steps: int) -> tuple[float, float, torch.Tensor]:
    """Wall seconds and process CPU seconds for one ``render`` of ``steps`` steps, and the picture.

    CPU seconds are less disturbed than wall time when other processes share the cores."""
    start, cpu = time.perf_counter(), time.process_time()
    img = render(model, [objective], (3, INPUT_SIZE, INPUT_SIZE), steps=steps, mean=MEAN, std=STD, seed=0)
    return time.perf_counter() - start, time.process_time() - cpu, img


def time_deconv(fn, model: torch.nn.Module, x: torch.Tensor, layer: str, channel_: int, repeats: int) -> float:
    """Projections per second: best of ``repeats`` passes over the batch ``x``."""
    fn(model, x[:1], layer, channel_)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(model, x, layer, channel_)
        best = min(best, time.perf_counter() - start)
    return x.shape[0] / best


def ascent_part(eff: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Truncated against full-network gradient ascent (see the module docstring)."""
    layer = args.layers[0]
    full = channel(layer, args.channel) + 0 * class_logit(0)
    # The first conv alone: what a render costs besides the network (parameterisation, transforms).
    variants = [(f"truncated:{name}", channel(name, args.channel)) for name in args.layers] + [
        ("full", full), ("overhead", channel("stem.conv", 0))]
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name, _ in variants}
    pictures: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        for name, obj in variants if r % 2 == 0 else variants[::-1]:
            seconds, cpu, pictures[name] = time_render(eff, obj, args.steps)
            times[name].append(seconds)
            cpu_times[name].append(cpu)
            print(f"ascent {name}: {seconds:.2f} s ({cpu:.2f} CPU s) for {args.steps} steps", flush=True)
    best = {name: min(t) for name, t in times.items()}
    best_cpu = {name: min(t) for name, t in cpu_times.items()}
    t_trunc, t_full, t_over = best[f"truncated:{layer}"], best["full"], best.pop("overhead")
    best_cpu.pop("overhead")
    same_picture = float((pictures[f"truncated:{layer}"] - pictures["full"]).abs().max())
    return {"ascent_truncated_s": round(t_trunc, 3), "ascent_full_s": round(t_full, 3),
            "ascent_speedup": round(t_full / t_trunc, 2),
            "ascent": {"model": "efficientnet_lite0", "layer": layer, "channel": args.channel,
                       "steps": args.steps, "image": [3, INPUT_SIZE, INPUT_SIZE], "param": "fourier",
                       "transforms": "standard", "repeats": args.repeats, "all_seconds": times,
                       "all_cpu_seconds": cpu_times,
                       "render_overhead_s": round(t_over, 3),
                       "network_speedup": round((t_full - t_over) / max(t_trunc - t_over, 1e-9), 2),
                       "speedup_per_layer": {name.split(":", 1)[1]: round(t_full / t, 2)
                                             for name, t in best.items() if name != "full"},
                       "cpu_speedup_per_layer": {name.split(":", 1)[1]: round(best_cpu["full"] / t, 2)
                                                 for name, t in best_cpu.items() if name != "full"},
                       "full_objective": "channel + 0 * class_logit(0) (same picture, full forward/backward)",
                       "max_abs_picture_difference": same_picture}}


def deconv_part(eff: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Deconvnet projections per second on random batches."""
    layer = args.layers[0]
    gen = torch.Generator().manual_seed(0)
    digits = DigitsCNN().eval()
    xd = torch.randn(64, 1, 64, 64, generator=gen)
    xe = torch.randn(16, 3, INPUT_SIZE, INPUT_SIZE, generator=gen)
    deconv = {
        "digits_cnn_explicit_features.relu4": time_deconv(deconvnet_explicit, digits, xd, "features.relu4", 5, 5),
        "digits_cnn_hooked_features.relu4": time_deconv(deconvnet, digits, xd, "features.relu4", 5, 5),
        f"efficientnet_lite0_hooked_{layer}": time_deconv(deconvnet, eff, xe, layer, args.channel, 3),
        "efficientnet_lite0_hooked_head": time_deconv(deconvnet, eff, xe, "head", args.channel, 3),
    }
    for k, v in deconv.items():
        print(f"deconv {k}: {v:.1f} images/s")
    return {"deconv_images_per_s": round(deconv[f"efficientnet_lite0_hooked_{layer}"], 2),
            "deconv": {"images_per_s": {k: round(v, 2) for k, v in deconv.items()},
                       "batches": {"digits_cnn": list(xd.shape), "efficientnet_lite0": list(xe.shape)}}}


def visualize_summary(overrides: list[str]) -> dict[str, Any]:
    """stage=visualize through the pipeline (outputs/ as the cache, so a trained model is reused)."""
    from hydra import compose, initialize_config_dir

    from pipeline.stages import run_stages

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["stage=visualize", "visualize.projection=both", "visualize.ascent.steps=1",
                                           "visualize.classes=[]", "visualize.all_classes_up_to=0", "progress=false",
                                           "device=cpu", *overrides])
    return run_stages(cfg)["stages"]["visualize"]


def dependence_part(args: argparse.Namespace) -> dict[str, Any]:
    """Input dependence of deconvnet and guided-backprop projections on two real models."""
    runs = {"digits": visualize_summary(["model=digits_cnn"]),
            "lite0": visualize_summary(["model=efficientnet_lite0", "data=photos", f"data.names=[{','.join(PHOTO_NAMES)}]",
                                        "visualize.layer=head"])}
    out: dict[str, Any] = {}
    details = {}
    for name, summary in runs.items():
        folder = Path(summary["index"]).parent
        written = json.loads((folder / "projections.json").read_text())
        for method, short in (("deconvnet", "deconv"), ("guided_backprop", "guided")):
            out[f"input_dependence_{short}_{name}"] = round(summary["input_dependence"][method], 4)
            out[f"flagged_{short}_{name}"] = method in summary["flagged_projections"]
        details[name] = {"layer": summary["layer"], "channels": summary["channels"], "max_pools": written["max_pools"],
                         "methods": {m: {k: v[k] for k in ("per_channel", "reason", "grid_dominated", "projections",
                                                           "grid_note")} for m, v in written["methods"].items()}}
        print(f"input dependence {name} {summary['layer']}: {summary['input_dependence']} "
              f"(flagged: {summary['flagged_projections']})", flush=True)
    return {**out, "input_dependence": {"max_spearman": 0.8, **details}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=256, help="ascent steps per render")
    parser.add_argument("--repeats", type=int, default=1, help="renders per variant (best is reported)")
    parser.add_argument("--layers", nargs="+", default=["blocks.4", "blocks.6"],
                        help="EfficientNet-Lite0 blocks to visualise; the first one gives the headline ratio")
    parser.add_argument("--channel", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    result: dict[str, Any] = json.loads(OUT.read_text()) if OUT.is_file() else {}
    result.setdefault("details", {})
    eff = load_efficientnet_lite0().eval()
    for part, run in (("ascent", lambda: ascent_part(eff, args)), ("deconv", lambda: deconv_part(eff, args)),
                      ("dependence", lambda: dependence_part(args))):
        if part not in args.parts:
            continue
        fields = run()
        detail = {k: fields.pop(k) for k in ("ascent", "deconv", "input_dependence") if k in fields}
        result.update(fields)
        result["details"].update(detail)
        result["details"].setdefault("threads", {})[part] = args.threads
    result.update({
        "threads": args.threads,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    })
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
