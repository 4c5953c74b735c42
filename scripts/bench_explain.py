"""Time each explanation method per image against Captum's equivalent, in the same run.

Models: the built-in digits_cnn (1x64x64) and torchvision resnet18 (3x224x224), random init.
Pairs: saliency vs Saliency(abs=False); smoothgrad vs NoiseTunnel(Saliency); occlusion (window 16,
stride 8, zero fill; the explain stage's default engine, and the plain engine) vs Occlusion with the
same window, stride, baseline and batch; gradcam vs LayerGradCam + bilinear interpolate; cam vs
LayerGradCam + interpolate (its nearest Captum equivalent). Each pair's outputs are compared too.

Writes ``outputs/bench/explain.json``: ``{model: {method: {"ms", "captum_ms", "speedup", ...}}}``
with speedup = captum_ms / ms. Usage: ``python scripts/bench_explain.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import captum
import torch
import torchvision
from captum.attr import LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion, Saliency
from torch import nn

from pipeline.methods.cam import GapHead, cam
from pipeline.methods.gradcam import gradcam
from pipeline.methods.hooks import get_layer
from pipeline.methods.occlusion import occlusion
from pipeline.methods.saliency import saliency
from pipeline.models.digits import DigitsCNN

OUT = Path("outputs/bench/explain.json")
WINDOW, STRIDE, BATCH = 16, 8, 64
SMOOTH_SAMPLES, SMOOTH_NOISE = 10, 0.15


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time in ms over ``repeats`` calls (after one warm-up call when repeats > 1)."""
    out = fn() if repeats > 1 else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), out


def models() -> dict[str, tuple[nn.Module, torch.Tensor, str, GapHead]]:
    """name -> (model, one input image, Grad-CAM layer, CAM head); random weights, eval mode."""
    torch.manual_seed(0)
    digits = DigitsCNN().eval()
    resnet = torchvision.models.resnet18(weights=None).eval()
    for m in resnet.modules():  # as the torchvision model source does: hooks see every activation
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return {"digits_cnn": (digits, torch.randn(1, 1, 64, 64), "features.relu4", GapHead("features.relu4", "fc")),
            "resnet18": (resnet, torch.randn(1, 3, 224, 224), "layer4", GapHead("layer4", "fc"))}


def bench_model(model: nn.Module, x: torch.Tensor, layer: str, head: GapHead, repeats: int,
                occlusion_repeats: int) -> dict[str, dict[str, Any]]:
    with torch.no_grad():
        target = int(model(x).argmax())
    size = tuple(x.shape[-2:])
    channels = x.shape[1]
    results: dict[str, dict[str, Any]] = {}

    def pair(name: str, ours: Callable[[], torch.Tensor], theirs: Callable[[], torch.Tensor], n: int) -> None:
        ms, a = timed(ours, n)
        captum_ms, b = timed(theirs, n)
        diff = float((a.detach().float() - b.detach().float()).abs().max())
        scale = float(b.detach().abs().max()) or 1.0
        results[name] = {"ms": round(ms, 2), "captum_ms": round(captum_ms, 2), "speedup": round(captum_ms / ms, 3),
                         "max_abs_diff": diff, "max_rel_diff": diff / scale, "repeats": n}
        print(f"  {name:16s} ours {ms:10.1f} ms   captum {captum_ms:10.1f} ms   speedup {captum_ms / ms:6.2f}x"
              f"   max rel diff {diff / scale:.1e}", flush=True)

    pair("saliency", lambda: saliency(model, x, target).grad,
         lambda: Saliency(model).attribute(x, target=target, abs=False), repeats)
    sigma = SMOOTH_NOISE * float(x.max() - x.min())
    ms, _ = timed(lambda: saliency(model, x, target, samples=SMOOTH_SAMPLES, noise=SMOOTH_NOISE), repeats)
    captum_ms, _ = timed(lambda: NoiseTunnel(Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=SMOOTH_SAMPLES, stdevs=sigma, target=target, abs=False), repeats)
    results["smoothgrad"] = {"ms": round(ms, 2), "captum_ms": round(captum_ms, 2), "speedup": round(captum_ms / ms, 3),
                             "samples": SMOOTH_SAMPLES, "repeats": repeats,
                             "note": "different random noise, so outputs are not compared"}
    print(f"  {'smoothgrad':16s} ours {ms:10.1f} ms   captum {captum_ms:10.1f} ms   speedup {captum_ms / ms:6.2f}x",
          flush=True)

    def captum_occlusion() -> torch.Tensor:
        attr = Occlusion(model).attribute(x, sliding_window_shapes=(channels, WINDOW, WINDOW),
                                          strides=(channels, STRIDE, STRIDE), baselines=0.0, target=target,
                                          perturbations_per_eval=BATCH)
        return attr[0].mean(0)  # identical over channels: the window spans them all

    captum_ms, captum_map = timed(captum_occlusion, occlusion_repeats)
    for name, engine in (("occlusion", "incremental"), ("occlusion_plain", "plain")):
        ms, ours = timed(lambda: occlusion(model, x, target, WINDOW, STRIDE, batch_size=BATCH, engine=engine)
                         .score_drop, occlusion_repeats)
        diff = float((ours - captum_map).abs().max())
        scale = float(captum_map.abs().max()) or 1.0
        results[name] = {"ms": round(ms, 2), "captum_ms": round(captum_ms, 2), "speedup": round(captum_ms / ms, 3),
                         "engine": engine, "window": WINDOW, "stride": STRIDE, "batch": BATCH,
                         "max_abs_diff": diff, "max_rel_diff": diff / scale, "repeats": occlusion_repeats}
        print(f"  {name:16s} ours {ms:10.1f} ms   captum {captum_ms:10.1f} ms   speedup {captum_ms / ms:6.2f}x"
              f"   max rel diff {diff / scale:.1e}", flush=True)

    module = get_layer(model, layer)

    def captum_gradcam() -> torch.Tensor:
        attr = LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")[:, 0]

    pair("gradcam", lambda: gradcam(model, x, target, layer), captum_gradcam, repeats)
    ms, _ = timed(lambda: cam(model, x, target, head=head), repeats)
    captum_ms, _ = timed(captum_gradcam, repeats)
    results["cam"] = {"ms": round(ms, 2), "captum_ms": round(captum_ms, 2), "speedup": round(captum_ms / ms, 3),
                      "captum_equivalent": "LayerGradCam + interpolate (Captum has no CAM)", "repeats": repeats}
    print(f"  {'cam':16s} ours {ms:10.1f} ms   captum {captum_ms:10.1f} ms   speedup {captum_ms / ms:6.2f}x",
          flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cheap method (median)")
    parser.add_argument("--occlusion-repeats-224", type=int, default=1,
                        help="timed occlusion calls at 224 (Captum takes ~30 s a call here)")
    parser.add_argument("--models", nargs="*", default=["digits_cnn", "resnet18"])
    args = parser.parse_args()
    out: dict[str, Any] = {}
    for name, (model, x, layer, head) in models().items():
        if name not in args.models:
            continue
        print(f"{name} {tuple(x.shape)}", flush=True)
        occ_repeats = args.repeats if x.shape[-1] <= 64 else args.occlusion_repeats_224
        out[name] = bench_model(model, x, layer, head, args.repeats, occ_repeats)
    print(f"torch {torch.__version__}, captum {captum.__version__}, {torch.get_num_threads()} threads, cpu, "
          f"{platform.machine()}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
