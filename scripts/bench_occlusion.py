"""Benchmark occlusion: Captum's Occlusion vs our plain batched, exact incremental (Krypton) and
approximate engines, in one run, on the same image and settings; checks that the outputs agree.

Writes outputs/bench/occlusion.json keyed by model with captum_s, plain_s, incremental_s,
approx_s, speedup_exact / speedup_approx (Captum time / ours), ssim_approx (Krypton's heat map:
the target probability with the patch at each position, at pixel resolution), ssim_approx_score
(the score-drop map), spearman_approx, the exact-vs-plain and plain-vs-Captum errors relative to
the map's range, and theory_ratio (Krypton's FLOP ratio for exact incremental inference).

    python scripts/bench_occlusion.py            # 224x224, window 16, stride 8 (729 positions)
    python scripts/bench_occlusion.py --quick    # 112x112 (169 positions)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import skimage.data
import torch
from captum.attr import Occlusion
from PIL import Image
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn
from torchvision import transforms
from torchvision.models import resnet18, vgg11

from pipeline.methods.occlusion import ApproximateEngine, IncrementalEngine
from pipeline.methods.occlusion import make_fill, occlusion, occlusion_boxes
from pipeline.models import efficientnet_lite

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _image(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """skimage's bundled cat photo, resized and center-cropped to ``size``, normalized."""
    transform = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    return transform(Image.fromarray(skimage.data.chelsea()))[None]


def _models(size: int) -> dict[str, tuple[nn.Module, torch.Tensor, str]]:
    """name -> (model in eval mode, input image, where the weights came from)."""
    torch.manual_seed(0)
    out: dict[str, tuple[nn.Module, torch.Tensor, str]] = {}
    imagenet = _image(size, IMAGENET_MEAN, IMAGENET_STD)
    out["resnet18"] = (resnet18(weights=None).eval(), imagenet, "random init")
    out["vgg11"] = (vgg11(weights=None).eval(), imagenet, "random init")
    lite_image = _image(size, efficientnet_lite.MEAN, efficientnet_lite.STD)
    try:
        out["efficientnet_lite0"] = (efficientnet_lite.load_efficientnet_lite0(), lite_image,
                                     "ImageNet pretrained")
    except Exception as exc:  # the weights package is optional: fall back to random weights
        print(f"efficientnet_lite0: pretrained weights unavailable ({exc}); using random init")
        out["efficientnet_lite0"] = (efficientnet_lite.build_efficientnet_lite0().eval(),
                                     lite_image, "random init")
    return out


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _ssim(reference: torch.Tensor, other: torch.Tensor) -> float:
    a, b = reference.double().numpy(), other.double().numpy()
    return float(structural_similarity(a, b, data_range=float(a.max() - a.min()) or 1.0))


def _rel_err(reference: torch.Tensor, other: torch.Tensor) -> float:
    scale = float(reference.max() - reference.min()) or 1.0
    return float((reference - other).abs().max()) / scale


def bench_model(model: nn.Module, x: torch.Tensor, window: int, stride: int, batch_size: int,
                plain_batch_size: int, captum_ppe: int, approx: dict[str, float]
                ) -> dict[str, float]:
    """Time the four ways of computing one occlusion map and compare their outputs."""
    with torch.no_grad():
        target = int(model(x).argmax())
    c = x.shape[1]
    fill = make_fill(x, "constant", 0.0)

    def captum() -> torch.Tensor:
        with torch.no_grad():
            return Occlusion(model).attribute(
                x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                baselines=fill, target=target, perturbations_per_eval=captum_ppe)[0, 0]

    ref, captum_s = _timed(captum)
    plain, plain_s = _timed(lambda: occlusion(model, x, target, window, stride,
                                              batch_size=plain_batch_size))

    def incremental() -> tuple[object, IncrementalEngine]:
        engine = IncrementalEngine(model, x)
        return occlusion(model, x, target, window, stride, batch_size=batch_size,
                         engine=engine), engine

    (exact, engine), incremental_s = _timed(incremental)

    def approximate() -> tuple[object, ApproximateEngine]:
        engine = ApproximateEngine(model, x, **approx)
        return occlusion(model, x, target, window, stride, batch_size=batch_size,
                         engine=engine), engine

    (fast, approx_engine), approx_s = _timed(approximate)
    boxes, _ = occlusion_boxes(x.shape[2], x.shape[3], window, stride)
    evaluated = approx_engine.evaluated
    approx_theory = approx_engine.flop_ratio(boxes[evaluated]) * len(boxes) / len(evaluated)
    return {
        "target": target,
        "positions": len(boxes),
        "captum_s": round(captum_s, 3),
        "plain_s": round(plain_s, 3),
        "incremental_s": round(incremental_s, 3),
        "approx_s": round(approx_s, 3),
        "speedup_plain": round(captum_s / plain_s, 2),
        "speedup_exact": round(captum_s / incremental_s, 2),
        "speedup_approx": round(captum_s / approx_s, 2),
        "exact_vs_plain": round(plain_s / incremental_s, 2),
        "approx_positions_evaluated": len(evaluated),
        "approx_bfloat16": approx_engine.low_precision,
        "ssim_approx": round(_ssim(exact.prob, fast.prob), 4),
        "ssim_approx_score": round(_ssim(exact.score_drop, fast.score_drop), 4),
        "spearman_approx": round(float(spearmanr(exact.score_drop_grid.flatten(),
                                                 fast.score_drop_grid.flatten())[0]), 4),
        "plain_vs_captum_rel_err": _rel_err(ref, plain.score_drop),
        "exact_vs_plain_rel_err": _rel_err(plain.score_drop, exact.score_drop),
        "exact_within_1e-4": _rel_err(plain.score_drop, exact.score_drop) <= 1e-4,
        "theory_ratio": round(engine.flop_ratio(boxes), 3),
        # MACs of exact occlusion over the approximate run's (positions evaluated, boxes after
        # tau); bfloat16 speed is not counted
        "theory_ratio_approx": round(approx_theory, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="112x112 images instead of 224x224")
    parser.add_argument("--models", default="resnet18,vgg11,efficientnet_lite0")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="positions per batch for the incremental and approximate engines")
    parser.add_argument("--plain-batch-size", type=int, default=16,
                        help="positions per batch for plain occlusion (16 was its fastest here)")
    parser.add_argument("--captum-ppe", type=int, default=1,
                        help="Captum perturbations_per_eval (its default is 1)")
    parser.add_argument("--tolerance", type=float,
                        default=ApproximateEngine.DEFAULTS["tolerance"],
                        help="approximate drill-down tolerance: refine where neighbours differ "
                             "by more than tolerance x fit x range (negative: every position)")
    parser.add_argument("--low-precision", type=int, choices=(0, 1),
                        default=int(ApproximateEngine.DEFAULTS["low_precision"]),
                        help="approximate engine: convolve changes in bfloat16 (1) or not (0)")
    parser.add_argument("--tau", type=float, default=ApproximateEngine.DEFAULTS["tau"],
                        help="approximate engine: projective-field threshold (default off)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is the fair comparison: Captum gains little from "
                             "more, and the machine is shared)")
    parser.add_argument("--out", default="outputs/bench/occlusion.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = 112 if args.quick else 224
    approx = {"tolerance": None if args.tolerance < 0 else args.tolerance,
              "low_precision": bool(args.low_precision), "tau": args.tau}
    results: dict[str, object] = {}
    load_before = os.getloadavg()
    for name, (model, x, weights) in _models(size).items():
        if name not in args.models.split(","):
            continue
        row = bench_model(model, x, args.window, args.stride, args.batch_size,
                          args.plain_batch_size, args.captum_ppe, approx)
        row["weights"] = weights
        results[name] = row
        print(name, json.dumps(row), flush=True)
    results["meta"] = {
        "image": f"skimage.data.chelsea resized to {size}x{size}",
        "window": args.window, "stride": args.stride, "batch_size": args.batch_size,
        "plain_batch_size": args.plain_batch_size,
        "fill": "constant 0", "captum_perturbations_per_eval": args.captum_ppe,
        "approx": approx, "threads": args.threads, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "note": "Shared machine: other jobs run concurrently, so absolute times are noisy; "
                "all methods of one model run back to back in the same process.",
        "ssim_definition": "skimage structural_similarity, data_range = exact map's range; "
                           "ssim_approx on the target-probability heat map (Krypton's), "
                           "ssim_approx_score on the score-drop map",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
