"""Time each explanation method per image against Captum's equivalent, in the same run.

Models: the built-in digits_cnn (1x64x64) and torchvision resnet18 (3x224x224), random init.
Pairs: saliency vs Saliency(abs=False); smoothgrad vs NoiseTunnel(Saliency); occlusion (window 16,
stride 8, zero fill; the explain stage's default engine, and the plain engine) vs Occlusion with the
same window, stride, baseline and batch; gradcam vs LayerGradCam + bilinear interpolate; cam vs
LayerGradCam + interpolate (its nearest Captum equivalent). Each pair's outputs are compared too.

Writes ``outputs/bench/explain.json``: ``{model: {method: {"ms", "captum_ms", "speedup", ...}}}``
with speedup = captum_ms / ms. Both sides run with the same number of torch threads (1 by default:
on a shared 2-core machine, 2 threads make timings swing by 10x or more).
Usage: ``python scripts/bench_explain.py [--repeats 9] [--threads 1]``.
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


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median wall time in ms of each function over ``repeats`` rounds, and its last output.

    The functions are called in turn within each round (after one warm-up round when repeats > 1),
    so that a change in the machine's load (it is shared) hits all of them alike.
    """
    outs: dict[str, Any] = {name: fn() for name, fn in fns.items()} if repeats > 1 else {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs[name] = fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}, outs


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


def entry(ms: float, captum_ms: float, ours: torch.Tensor | None = None, theirs: torch.Tensor | None = None,
          **extra: Any) -> dict[str, Any]:
    """One method's JSON entry; with outputs, their largest absolute and relative difference."""
    out: dict[str, Any] = {"ms": round(ms, 2), "captum_ms": round(captum_ms, 2), "speedup": round(captum_ms / ms, 3)}
    if ours is not None and theirs is not None:
        diff = float((ours.detach().float() - theirs.detach().float()).abs().max())
        out["max_abs_diff"] = diff
        out["max_rel_diff"] = diff / (float(theirs.detach().abs().max()) or 1.0)
    out.update(extra)
    print(f"  {extra.get('name', ''):16s} ours {ms:10.1f} ms   captum {captum_ms:10.1f} ms   speedup "
          f"{captum_ms / ms:6.2f}x" + (f"   max rel diff {out['max_rel_diff']:.1e}" if "max_rel_diff" in out else ""),
          flush=True)
    out.pop("name", None)
    return out


def bench_model(model: nn.Module, x: torch.Tensor, layer: str, head: GapHead, repeats: int,
                occlusion_repeats: int) -> dict[str, dict[str, Any]]:
    with torch.no_grad():
        target = int(model(x).argmax())
    size = tuple(x.shape[-2:])
    channels = x.shape[1]
    module = get_layer(model, layer)
    sigma = SMOOTH_NOISE * float(x.max() - x.min())

    def captum_gradcam() -> torch.Tensor:
        attr = LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")[:, 0]

    def captum_occlusion() -> torch.Tensor:
        attr = Occlusion(model).attribute(x, sliding_window_shapes=(channels, WINDOW, WINDOW),
                                          strides=(channels, STRIDE, STRIDE), baselines=0.0, target=target,
                                          perturbations_per_eval=BATCH)
        return attr[0].mean(0)  # identical over channels: the window spans them all

    ms, out = timed({
        "saliency": lambda: saliency(model, x, target).grad,
        "captum_saliency": lambda: Saliency(model).attribute(x, target=target, abs=False),
        "smoothgrad": lambda: saliency(model, x, target, samples=SMOOTH_SAMPLES, noise=SMOOTH_NOISE).grad,
        "captum_smoothgrad": lambda: NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=SMOOTH_SAMPLES, stdevs=sigma, target=target, abs=False),
        "gradcam": lambda: gradcam(model, x, target, layer),
        "cam": lambda: cam(model, x, target, head=head),
        "captum_gradcam": captum_gradcam,
    }, repeats)
    occ_ms, occ = timed({
        "occlusion": lambda: occlusion(model, x, target, WINDOW, STRIDE, batch_size=BATCH,
                                       engine="incremental").score_drop,
        "occlusion_plain": lambda: occlusion(model, x, target, WINDOW, STRIDE, batch_size=BATCH,
                                             engine="plain").score_drop,
        "captum_occlusion": captum_occlusion,
    }, occlusion_repeats)
    threads = torch.get_num_threads()
    common = {"repeats": repeats, "threads": threads}
    occ_common = {"window": WINDOW, "stride": STRIDE, "batch": BATCH, "repeats": occlusion_repeats, "threads": threads}
    return {
        "saliency": entry(ms["saliency"], ms["captum_saliency"], out["saliency"], out["captum_saliency"],
                          name="saliency", **common),
        "smoothgrad": entry(ms["smoothgrad"], ms["captum_smoothgrad"], name="smoothgrad", samples=SMOOTH_SAMPLES,
                            note="different random noise, so outputs are not compared", **common),
        "occlusion": entry(occ_ms["occlusion"], occ_ms["captum_occlusion"], occ["occlusion"],
                           occ["captum_occlusion"], name="occlusion", engine="incremental", **occ_common),
        "occlusion_plain": entry(occ_ms["occlusion_plain"], occ_ms["captum_occlusion"], occ["occlusion_plain"],
                                 occ["captum_occlusion"], name="occlusion_plain", engine="plain", **occ_common),
        "gradcam": entry(ms["gradcam"], ms["captum_gradcam"], out["gradcam"], out["captum_gradcam"],
                         name="gradcam", **common),
        "cam": entry(ms["cam"], ms["captum_gradcam"], name="cam",
                     captum_equivalent="LayerGradCam + interpolate (Captum has no CAM)", **common),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds of the cheap methods (median)")
    parser.add_argument("--occlusion-repeats-224", type=int, default=1,
                        help="timed occlusion calls at 224 (Captum takes ~30 s a call here)")
    parser.add_argument("--models", nargs="*", default=["digits_cnn", "resnet18"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both sides (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
