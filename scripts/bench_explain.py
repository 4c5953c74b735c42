"""Time every registered map method per image against its reference implementation, in the same run.

Models: EfficientNet-Lite0 (its ImageNet weights) and torchvision resnet18 (random init), both on
scikit-image's cat photo at 224x224 through the model's own preprocessing. References: Captum for
the gradient methods and occlusion, pytorch-grad-cam for the CAM family, and for RISE (which
neither library has) a direct transcription of the authors' algorithm (all masks made up front,
masked batches through the model, probabilities times masks). Each pair's outputs are compared too
(``max_rel_diff``, on maps scaled the same way; methods with random draws are timed only).

Per image: one image per call on both sides. Batched (``--batch``, default 32, cheap methods
only): one call on 32 images against 32 calls of the reference.

Writes ``outputs/bench/explain.json``: ``{model: {method: {"ms", "reference_ms", "speedup",
"reference", ...}}}`` with speedup = reference_ms / ms, one entry per registered method (a method
without a reference gets ``reference: null``). Both sides run with the same number of torch threads
(1 by default: on a shared 2-core machine, 2 threads make timings swing). A method with a
``low_precision`` setting is timed at its default (``precision`` in its entry: RISE in bfloat16 where
that is native, Score-CAM in float32) and the other way too (``float32`` / ``low_precision``), beside
how far that moves its map and, for RISE, how far another seed moves it.
Usage: ``python scripts/bench_explain.py [--repeats 3] [--threads 1] [--models resnet18]``.
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
import pytorch_grad_cam
import torch
import torchvision
from captum.attr import (GuidedBackprop, GuidedGradCam, InputXGradient, IntegratedGradients, LayerAttribution,
                         LayerGradCam, NoiseTunnel, Occlusion, Saliency)
from PIL import Image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from skimage import data as skdata
from torch import nn

from pipeline.methods.base import MapMethod
from pipeline.methods.execution import low_precision_active
from pipeline.methods.hooks import get_layer
from pipeline.methods.masking import rise_masks
from pipeline.methods.registry import METHODS, make_method
from pipeline.models.efficientnet_lite import efficientnet_lite0_transform, load_efficientnet_lite0

OUT = Path("outputs/bench/explain.json")
# settings used on both sides; every other setting is the method's default
SETTINGS: dict[str, dict[str, Any]] = {
    "smoothgrad": {"samples": 10}, "integrated_gradients": {"steps": 50},
    "occlusion": {"window": 16, "stride": 8, "batch_size": 64}, "rise": {"masks": 500, "cells": 7, "p": 0.5, "seed": 0},
}
CHEAP = ("saliency", "input_x_gradient", "guided_backprop", "gradcam", "gradcam_plusplus",
         "xgradcam", "layercam", "hirescam", "eigencam", "guided_gradcam")
Reference = Callable[[nn.Module, torch.Tensor, int, str], torch.Tensor]


def _grad_cam(cls: type) -> Reference:
    def run(model: nn.Module, x: torch.Tensor, target: int, layer: str) -> torch.Tensor:
        with cls(model=model, target_layers=[get_layer(model, layer)]) as cam:
            return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(target)]))
    return run


def _captum_occlusion(model: nn.Module, x: torch.Tensor, target: int, layer: str) -> torch.Tensor:
    s = SETTINGS["occlusion"]
    c = x.shape[1]
    attr = Occlusion(model).attribute(x, sliding_window_shapes=(c, s["window"], s["window"]),
                                      strides=(c, s["stride"], s["stride"]), baselines=0.0, target=target,
                                      perturbations_per_eval=s["batch_size"])
    return attr[:, 0]


def _captum_gradcam(model: nn.Module, x: torch.Tensor, target: int, layer: str) -> torch.Tensor:
    attr = LayerGradCam(model, get_layer(model, layer)).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]


def _rise(model: nn.Module, x: torch.Tensor, target: int, layer: str) -> torch.Tensor:
    """RISE as the authors' code does it: all masks made up front (here the same masks as ours, so
    the outputs compare), every masked image made at once, then batches of them through the model."""
    s = SETTINGS["rise"]
    n, p = s["masks"], s["p"]
    h, w = x.shape[-2:]
    masks = rise_masks(n, s["cells"], p, 0, (h, w))[:, None]
    stack = masks * x
    with torch.no_grad():
        probs = torch.cat([model(stack[i:i + 100]).softmax(1) for i in range(0, n, 100)])
    return (probs[:, target] @ masks.view(n, -1)).view(1, h, w) / (n * p)


REFERENCES: dict[str, tuple[str, Reference]] = {
    "saliency": ("captum Saliency(abs=True), max over channels",
                 lambda m, x, t, _l: Saliency(m).attribute(x, target=t, abs=True).amax(1)),
    "smoothgrad": ("captum NoiseTunnel(Saliency), smoothgrad",
                   lambda m, x, t, _l: NoiseTunnel(Saliency(m)).attribute(
                       x, nt_type="smoothgrad", nt_samples=SETTINGS["smoothgrad"]["samples"],
                       stdevs=0.15 * float(x.max() - x.min()), target=t, abs=True).amax(1)),
    "input_x_gradient": ("captum InputXGradient, summed over channels",
                         lambda m, x, t, _l: InputXGradient(m).attribute(x, target=t).sum(1)),
    "integrated_gradients": ("captum IntegratedGradients (50 steps, gausslegendre), summed over channels",
                             lambda m, x, t, _l: IntegratedGradients(m).attribute(
                                 x, target=t, n_steps=SETTINGS["integrated_gradients"]["steps"]).sum(1)),
    "guided_backprop": ("captum GuidedBackprop, max |.| over channels (Captum does not guide ReLU6)",
                        lambda m, x, t, _l: GuidedBackprop(m).attribute(x, target=t).abs().amax(1)),
    "guided_gradcam": ("captum GuidedGradCam (bilinear), max |.| over channels (Captum does not guide ReLU6)",
                       lambda m, x, t, l: GuidedGradCam(m, get_layer(m, l)).attribute(
                           x, target=t, interpolate_mode="bilinear").abs().amax(1)),
    "occlusion": ("captum Occlusion (same window, stride, zero fill, 64 per eval)", _captum_occlusion),
    "cam": ("captum LayerGradCam + bilinear interpolate (neither library has plain CAM)", _captum_gradcam),
    "gradcam": ("pytorch-grad-cam GradCAM", _grad_cam(pytorch_grad_cam.GradCAM)),
    "gradcam_plusplus": ("pytorch-grad-cam GradCAMPlusPlus", _grad_cam(pytorch_grad_cam.GradCAMPlusPlus)),
    "xgradcam": ("pytorch-grad-cam XGradCAM", _grad_cam(pytorch_grad_cam.XGradCAM)),
    "layercam": ("pytorch-grad-cam LayerCAM", _grad_cam(pytorch_grad_cam.LayerCAM)),
    "hirescam": ("pytorch-grad-cam HiResCAM", _grad_cam(pytorch_grad_cam.HiResCAM)),
    "eigencam": ("pytorch-grad-cam EigenCAM", _grad_cam(pytorch_grad_cam.EigenCAM)),
    "scorecam": ("pytorch-grad-cam ScoreCAM", _grad_cam(pytorch_grad_cam.ScoreCAM)),
    "ablationcam": ("pytorch-grad-cam AblationCAM", _grad_cam(pytorch_grad_cam.AblationCAM)),
    "rise": ("the authors' algorithm (eclique/RISE) on the same masks", _rise),
}
RANDOM = {"smoothgrad"}          # different random draws on each side: timed, not compared
# cam's stand-in reference (Grad-CAM) computes something else; Eigen-CAM's principal-component sign
# is fixed here and arbitrary in pytorch-grad-cam (tests/test_cam_family.py compares up to the sign)
NOT_COMPARED = RANDOM | {"cam", "eigencam"}
SCALED = {"gradcam", "gradcam_plusplus", "xgradcam", "layercam", "hirescam", "eigencam", "scorecam", "ablationcam"}


def timed(fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
    """Median wall time in ms of each function over ``repeats`` rounds (after one warm-up round unless
    ``warmup`` is off: a call of many seconds needs none), and its last output; the functions
    alternate within a round so load changes hit both alike."""
    outs = {name: fn() for name, fn in fns.items()} if warmup else {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs[name] = fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def _minmax(m: torch.Tensor) -> torch.Tensor:
    flat = m.detach().float().flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo + 1e-7)).view(m.shape)


def difference(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest value (both min-max scaled for the
    CAM family, whose reference returns scaled maps)."""
    a, b = ours.detach().float().cpu(), theirs.detach().float().cpu()
    if name in SCALED:
        a, b = _minmax(a), _minmax(b)
    return float((a - b).abs().max()) / (float(b.abs().max()) or 1.0)


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """name -> (model in eval mode, the cat photo through its preprocessing (1,3,224,224))."""
    cat = Image.fromarray(skdata.chelsea())
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    for m in resnet.modules():  # as the torchvision model source does: hooks see every activation
        if isinstance(m, nn.ReLU):
            m.inplace = False
    tv = torchvision.transforms
    resnet_tf = tv.Compose([tv.Resize(256), tv.CenterCrop(224), tv.ToTensor(),
                            tv.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return {"efficientnet_lite0": (load_efficientnet_lite0().eval(), efficientnet_lite0_transform()(cat)[None]),
            "resnet18": (resnet, resnet_tf(cat)[None])}


def precision_entry(name: str, model: nn.Module, x: torch.Tensor, target: int, repeats: int, warmup: bool,
                    out: dict[str, Any], reference_ms: float, low: bool) -> dict[str, Any]:
    """The method with ``low_precision`` set to ``low`` (the other way from its default): its time,
    its speedup over the reference, and how far its map is from the default's and the reference's;
    for a method with random draws, also how far another seed moves the default map (its own noise)."""
    settings = dict(SETTINGS.get(name) or {})
    other = make_method(name, {**settings, "low_precision": low}).prepare(model, x)
    ms, got = timed({"other": lambda: other(model, x, target)}, repeats, warmup)
    entry = {"ms": round(ms["other"], 2), "speedup": round(reference_ms / ms["other"], 3),
             "max_rel_diff_to_default": difference(name, got["other"], out["ours"])}
    if name not in NOT_COMPARED:
        entry["max_rel_diff_to_reference"] = difference(name, got["other"], out["ref"])
    if "seed" in settings:
        seed = make_method(name, {**settings, "seed": settings["seed"] + 1}).prepare(model, x)
        entry["default_other_seed_max_rel_diff"] = difference(name, seed(model, x, target), out["ours"])
    return entry


def bench_method(name: str, method: MapMethod, model: nn.Module, x: torch.Tensor, target: int,
                 repeats: int, batch: int, warmup: bool = True) -> dict[str, Any]:
    """One method's entry: per-image times, ratio, output difference; batched figures for cheap methods."""
    layer = str(method.settings.get("layer") or "")
    entry: dict[str, Any] = {"settings": method.key_settings(), "threads": torch.get_num_threads()}
    if name not in REFERENCES:
        ms, _ = timed({"ours": lambda: method(model, x, target)}, repeats, warmup)
        entry.update(ms=round(ms["ours"], 2), reference=None, reference_ms=None, speedup=None)
        print(f"  {name:22s} ours {ms['ours']:10.1f} ms   (no reference implementation)", flush=True)
        return entry
    label, ref = REFERENCES[name]
    ms, out = timed({"ours": lambda: method(model, x, target), "ref": lambda: ref(model, x, target, layer)},
                    repeats, warmup)
    entry.update(ms=round(ms["ours"], 2), reference_ms=round(ms["ref"], 2), speedup=round(ms["ref"] / ms["ours"], 3),
                 reference=label, repeats=repeats)
    if name not in NOT_COMPARED:
        entry["max_rel_diff"] = difference(name, out["ours"], out["ref"])
    line_low = ""
    if "low_precision" in method.settings and low_precision_active(x.device):
        low = not METHODS[name].DEFAULTS["low_precision"]
        key = "low_precision" if low else "float32"
        entry["precision"] = "float32" if low else "bfloat16"
        entry[key] = precision_entry(name, model, x, target, repeats, warmup, out, ms["ref"], low)
        line_low = f"   {key} {entry[key]['speedup']:5.2f}x"
    if name == "gradcam":  # Captum's Grad-CAM too, beside pytorch-grad-cam's
        cap, _ = timed({"captum": lambda: _captum_gradcam(model, x, target, layer)}, repeats)
        entry["captum_ms"] = round(cap["captum"], 2)
    line = (f"  {name:22s} ours {ms['ours']:10.1f} ms   reference {ms['ref']:10.1f} ms   speedup "
            f"{ms['ref'] / ms['ours']:6.2f}x" + (f"   max rel diff {entry['max_rel_diff']:.1e}"
                                                   if "max_rel_diff" in entry else "") + line_low)
    if batch > 1 and name in CHEAP:
        xs = x.expand(batch, -1, -1, -1).contiguous() + 0.01 * torch.randn(batch, *x.shape[1:],
                                                                          generator=torch.Generator().manual_seed(1))
        targets = torch.full((batch,), target)
        bms, _ = timed({"ours": lambda: method(model, xs, targets),
                        "ref": lambda: [ref(model, xs[i:i + 1], target, layer) for i in range(batch)]}, 1)
        entry.update(batch=batch, batch_ms_per_image=round(bms["ours"] / batch, 2),
                     reference_batch_ms_per_image=round(bms["ref"] / batch, 2),
                     batch_speedup=round(bms["ref"] / bms["ours"], 3))
        line += f"   batched x{batch}: {bms['ref'] / bms['ours']:5.2f}x"
    print(line, flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method (median)")
    parser.add_argument("--batch", type=int, default=32, help="images in the batched figure (1: skip it)")
    parser.add_argument("--models", nargs="*", default=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both sides (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for model_name, (model, x) in models().items():
        if model_name not in args.models:
            continue
        with torch.no_grad():
            target = int(model(x).argmax())
        print(f"{model_name} {tuple(x.shape)}, target {target}", flush=True)
        results = out.setdefault(model_name, {})
        for name in args.methods:
            method = make_method(name, SETTINGS.get(name)).prepare(model, x)
            slow = METHODS[name].many_passes
            results[name] = bench_method(name, method, model, x, target, 1 if slow else args.repeats, args.batch,
                                         warmup=not slow)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(out, indent=2) + "\n")
    out["environment"] = {"torch": torch.__version__, "captum": captum.__version__, "threads": torch.get_num_threads(),
                          "machine": platform.machine(), "device": "cpu"}
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
