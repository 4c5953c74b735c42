"""Feature visualisation by gradient ascent on the input (Erhan et al. 2009, Olah et al. 2017).

The design follows Lucid/Lucent: objectives are composable values (``channel(l, 3) - 0.5 *
channel(l, 7)``) and a parameterisation returns the parameters to optimise plus a function that
turns them into an image. Unlike Lucent there is no module-global device (everything follows the
model's parameters) and nothing is saved or shown here: ``render`` returns a tensor.

The forward pass stops at the deepest layer the objectives read (``truncated_forward``), several
objectives are rendered in one batch (objective i drives image i), and all randomness comes from one
``torch.Generator`` so that a render is reproducible on CPU. Every image in a batch starts from the
same noise and sees the same random transforms, so image i depends only on objective i and the seed,
not on what else shares its batch (results can be cached per objective).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.methods.blur import gaussian_blur
from pipeline.methods.hooks import get_layer, truncated_forward

LOGITS = ""
"""Layer name of the model's own output (the root module in ``named_modules()``): the logits."""

Activations = Mapping[str, Tensor]
Transform = Callable[[Tensor, torch.Generator], Tensor]


# --------------------------------------------------------------------------------------------
# Objectives


class Objective:
    """A score per image computed from captured activations: ``acts -> (B,)``, to be maximised.

    Objectives add, subtract, negate and scale by numbers, giving new objectives whose ``layers``
    is the union of the parts' layers (what the forward pass must capture).
    """

    __slots__ = ("_fn", "layers", "name")

    def __init__(self, fn: Callable[[Activations], Tensor], layers: Iterable[str], name: str) -> None:
        self._fn = fn
        self.layers: frozenset[str] = frozenset(layers)
        self.name = name

    def __call__(self, acts: Activations) -> Tensor:
        return self._fn(acts)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda a: self(a) + other(a), self.layers | other.layers,
                             f"{self.name} + {other.name}")
        if isinstance(other, (int, float)):
            return Objective(lambda a: self(a) + other, self.layers, f"{self.name} + {other:g}")
        return NotImplemented

    def __radd__(self, other: float) -> Objective:
        if isinstance(other, (int, float)) and other == 0:  # lets sum([...]) start from 0
            return self
        return self.__add__(other)

    def __neg__(self) -> Objective:
        return Objective(lambda a: -self(a), self.layers, f"-({self.name})")

    def __sub__(self, other: Objective | float) -> Objective:
        if isinstance(other, (Objective, int, float)):
            return self + (-other)
        return NotImplemented

    def __rsub__(self, other: float) -> Objective:
        return (-self) + other

    def __mul__(self, k: float) -> Objective:
        if not isinstance(k, (int, float)):
            return NotImplemented
        return Objective(lambda a: k * self(a), self.layers, f"{k:g}*({self.name})")

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Objective:
        if not isinstance(k, (int, float)):
            return NotImplemented
        return self * (1.0 / k)


def _layer_output(acts: Activations, layer: str) -> Tensor:
    if layer not in acts:
        raise PipelineError(f"objective needs layer {layer!r} but it was not captured; "
                            f"captured: {sorted(acts)}")
    return acts[layer]


def _check_channel(a: Tensor, c: int, layer: str) -> None:
    if a.dim() < 2:
        raise PipelineError(f"layer {layer!r} has output shape {tuple(a.shape)} with no channel axis")
    if not 0 <= c < a.shape[1]:
        raise PipelineError(f"channel {c} is out of range for layer {layer!r}, which has "
                            f"{a.shape[1]} channels: use 0..{a.shape[1] - 1}")


def class_logit(k: int) -> Objective:
    """Pre-softmax score of class ``k`` (the model output, layer ``LOGITS``)."""
    def fn(acts: Activations) -> Tensor:
        out = _layer_output(acts, LOGITS)
        if out.dim() != 2:
            raise PipelineError(f"class_logit needs (B, K) logits, the model returned shape "
                                f"{tuple(out.shape)}")
        if not 0 <= k < out.shape[1]:
            raise PipelineError(f"class {k} is out of range: the model has {out.shape[1]} classes "
                                f"(use 0..{out.shape[1] - 1})")
        return out[:, k]
    return Objective(fn, [LOGITS], f"class_logit({k})")


def class_logprob(k: int) -> Objective:
    """Log-softmax of class ``k``: its logit minus the log-sum-exp of all logits.

    Unlike ``class_logit`` this also pushes the other classes down, so the image ends up classified
    as ``k`` even where features of class ``k`` raise a correlated class's logit faster.
    """
    logit = class_logit(k)

    def fn(acts: Activations) -> Tensor:
        out = _layer_output(acts, LOGITS)
        return logit(acts) - torch.logsumexp(out, dim=1)
    return Objective(fn, [LOGITS], f"class_logprob({k})")


def class_objective(k: int) -> Objective:
    """The recommended objective for a class visualisation: ``class_logit(k) + class_logprob(k)``.

    The logit term keeps the image contrasty once the class wins (the log-softmax alone saturates
    and leaves grey images); the log-softmax term stops a correlated class from winning (with the
    logit alone, a digits model's "9" visualisation was classified as "5").
    """
    return class_logit(k) + class_logprob(k)


def channel(layer: str, c: int) -> Objective:
    """Mean activation of channel ``c`` of ``layer`` over all positions (the unit itself for (B, C))."""
    def fn(acts: Activations) -> Tensor:
        a = _layer_output(acts, layer)
        _check_channel(a, c, layer)
        return a[:, c].reshape(a.shape[0], -1).mean(dim=1)
    return Objective(fn, [layer], f"channel({layer}, {c})")


def neuron(layer: str, c: int, y: int | None = None, x: int | None = None) -> Objective:
    """One unit of channel ``c`` of ``layer`` at (y, x); the centre of the map by default."""
    def fn(acts: Activations) -> Tensor:
        a = _layer_output(acts, layer)
        _check_channel(a, c, layer)
        if a.dim() == 2:
            if y is not None or x is not None:
                raise PipelineError(f"layer {layer!r} has no spatial axes (shape "
                                    f"{tuple(a.shape)}); leave y and x unset")
            return a[:, c]
        if a.dim() != 4:
            raise PipelineError(f"neuron needs a (B, C, H, W) or (B, C) layer; {layer!r} has "
                                f"shape {tuple(a.shape)}")
        h, w = a.shape[2:]
        yy = h // 2 if y is None else y
        xx = w // 2 if x is None else x
        if not (0 <= yy < h and 0 <= xx < w):
            raise PipelineError(f"position ({yy}, {xx}) is outside layer {layer!r}'s {h}x{w} map")
        return a[:, c, yy, xx]
    where = "centre" if y is None and x is None else f"{y}, {x}"
    return Objective(fn, [layer], f"neuron({layer}, {c}, {where})")


# --------------------------------------------------------------------------------------------
# Parameterisations

# Square root of ImageNet's RGB colour covariance, from Lucid (Olah et al. 2017): images are
# optimised in a decorrelated colour space and mixed back by this matrix.
_COLOR_SQRT_COV = torch.tensor([[0.26, 0.09, 0.02],
                                [0.27, 0.00, -0.05],
                                [0.27, -0.09, 0.03]])
_COLOR_MIX = _COLOR_SQRT_COV / _COLOR_SQRT_COV.norm(dim=0).max()


class Parameterization(NamedTuple):
    """What is optimised: ``params``; ``image_fn()`` -> (B, C, H, W) in (0, 1); ``blur(sigma)``
    smooths the current image in place (linear in the pre-sigmoid image, so it acts on params)."""

    params: list[Tensor]
    image_fn: Callable[[], Tensor]
    blur: Callable[[float], None]


def decorrelate_color(t: Tensor) -> Tensor:
    """Mix decorrelated channels back into RGB (3 channels); the identity for any other count."""
    if t.shape[1] != 3:
        return t
    return torch.einsum("bchw,dc->bdhw", t, _COLOR_MIX.to(t))


def _noise(batch: int, shape: Sequence[int], generator: torch.Generator, sd: float,
           device: torch.device) -> Tensor:
    """One draw of noise repeated for every image, so images do not depend on their batch mates."""
    one = torch.randn((1, *shape), generator=generator) * sd
    return one.repeat(batch, *([1] * len(shape))).to(device).requires_grad_(True)


def pixel_image(batch: int, shape: Sequence[int], generator: torch.Generator, *, sd: float = 0.01,
                decorrelate: bool = True, device: torch.device | str = "cpu") -> Parameterization:
    """Pixels as parameters: image = sigmoid(colour_mix(params))."""
    raw = _noise(batch, shape, generator, sd, torch.device(device))

    def image_fn() -> Tensor:
        return torch.sigmoid(decorrelate_color(raw) if decorrelate else raw)

    def blur(sigma: float) -> None:
        with torch.no_grad():
            raw.copy_(gaussian_blur(raw, sigma))

    return Parameterization([raw], image_fn, blur)


def _frequencies(h: int, w: int, device: torch.device) -> Tensor:
    """Radial frequency (cycles per pixel) of each rfft2 coefficient, shape (h, w // 2 + 1)."""
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.rfftfreq(w, device=device)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def fourier_image(batch: int, shape: Sequence[int], generator: torch.Generator, *,
                  sd: float = 0.01, decay_power: float = 1.0, decorrelate: bool = True,
                  device: torch.device | str = "cpu") -> Parameterization:
    """Spectrum as parameters, scaled by 1/f^decay so all frequencies learn at similar rates.

    image = sigmoid(colour_mix(irfft2(scale * spectrum) / 4)), as in Lucid's ``fft_image``: the
    1/f scaling whitens the gradient, which removes most high-frequency noise from the result.
    """
    c, h, w = shape
    dev = torch.device(device)
    freqs = _frequencies(h, w, dev)
    scale = (1.0 / freqs.clamp(min=1.0 / max(h, w)) ** decay_power)[None, None, :, :, None]
    spectrum = _noise(batch, (c, h, w // 2 + 1, 2), generator, sd, dev)

    def image_fn() -> Tensor:
        coeffs = torch.view_as_complex((scale * spectrum).contiguous())
        img = torch.fft.irfft2(coeffs, s=(h, w), norm="ortho") / 4.0
        return torch.sigmoid(decorrelate_color(img) if decorrelate else img)

    def blur(sigma: float) -> None:
        # A Gaussian blur multiplies each frequency f by exp(-2 pi^2 sigma^2 f^2).
        gain = torch.exp(-2 * math.pi ** 2 * sigma ** 2 * freqs ** 2)
        with torch.no_grad():
            spectrum.mul_(gain[None, None, :, :, None])

    return Parameterization([spectrum], image_fn, blur)


# --------------------------------------------------------------------------------------------
# Transforms (size-preserving; one random draw per call, shared by the whole batch)


def _choice(values: Sequence[float], g: torch.Generator) -> float:
    return float(values[int(torch.randint(len(values), (1,), generator=g))])


def jitter(d: int) -> Transform:
    """Shift the image by a random (dy, dx) in [-d, d]^2 (reflect-padded, size unchanged)."""
    def t(img: Tensor, g: torch.Generator) -> Tensor:
        if d <= 0:
            return img
        dy, dx = (int(v) for v in torch.randint(0, 2 * d + 1, (2,), generator=g))
        h, w = img.shape[2:]
        return F.pad(img, (d, d, d, d), mode="reflect")[:, :, dy:dy + h, dx:dx + w]
    return t


def _affine(img: Tensor, zoom: float, degrees: float) -> Tensor:
    a = math.radians(degrees)
    cos, sin = math.cos(a) / zoom, math.sin(a) / zoom
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=img.dtype, device=img.device)
    grid = F.affine_grid(theta.expand(img.shape[0], 2, 3), list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_scale(scales: Sequence[float]) -> Transform:
    """Zoom about the centre by a factor drawn from ``scales`` (size unchanged)."""
    return lambda img, g: _affine(img, _choice(scales, g), 0.0)


def random_rotate(degrees: Sequence[float]) -> Transform:
    """Rotate about the centre by an angle (degrees) drawn from ``degrees``."""
    return lambda img, g: _affine(img, 1.0, _choice(degrees, g))


def standard_transforms(image_size: int) -> list[Transform]:
    """Lucid's robustness transforms scaled to the image: jitter, zoom 0.9-1.1, rotate +-10 deg,
    jitter (8 and 4 pixels at 224, 2 and 1 at 64)."""
    big = max(1, round(8 * image_size / 224))
    small = max(1, round(4 * image_size / 224))
    return [jitter(big),
            random_scale([1 + (i - 5) / 50 for i in range(11)]),
            random_rotate(list(range(-10, 11))),
            jitter(small)]


def total_variation(img: Tensor) -> Tensor:
    """Mean absolute difference between neighbouring pixels, per image (B,)."""
    dy = (img[:, :, 1:, :] - img[:, :, :-1, :]).abs().flatten(1).mean(1)
    dx = (img[:, :, :, 1:] - img[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


# --------------------------------------------------------------------------------------------
# Rendering


def _normalizer(mean: Sequence[float] | None, std: Sequence[float] | None, c: int,
                ref: Tensor) -> Callable[[Tensor], Tensor]:
    m = torch.zeros(c) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    s = torch.ones(c) if std is None else torch.as_tensor(std, dtype=torch.float32)
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise PipelineError(f"mean/std must have 1 or {c} values (one per input channel), got "
                            f"{m.numel()} and {s.numel()}")
    if (s <= 0).any():
        raise PipelineError("std values must be positive")
    m = m.to(ref).view(1, -1, 1, 1)
    s = s.to(ref).view(1, -1, 1, 1)
    return lambda img: (img - m) / s


def _per_image_scores(objectives: Sequence[Objective], acts: Activations) -> Tensor:
    return torch.stack([obj({k: v[i:i + 1] for k, v in acts.items()})[0]
                        for i, obj in enumerate(objectives)])


def _model_ref(model: nn.Module) -> Tensor:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), torch.zeros(()))
    return p.detach()


def _require_eval(model: nn.Module, what: str) -> None:
    if model.training:
        raise PipelineError(f"{what} needs the model in eval mode (BatchNorm and dropout would "
                            f"otherwise change the model): call model.eval() first")


def objective_values(model: nn.Module, objectives: Sequence[Objective], images: Tensor, *,
                     mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> Tensor:
    """Score of objective i on image i ((B, C, H, W) in [0, 1]), without gradients: (B,)."""
    _require_eval(model, "objective_values")
    if len(objectives) != images.shape[0]:
        raise PipelineError(f"{len(objectives)} objectives for {images.shape[0]} images; give one "
                            f"objective per image")
    norm = _normalizer(mean, std, images.shape[1], images)
    layers = set().union(*(o.layers for o in objectives))
    with torch.no_grad():
        return _per_image_scores(objectives, truncated_forward(model, norm(images), layers))


def render(model: nn.Module, objectives: Sequence[Objective], image_shape: Sequence[int], *,
           steps: int = 256, lr: float = 0.05, param: str = "fourier",
           transforms: Sequence[Transform] | None = None, l2: float = 0.0, tv: float = 0.0,
           blur_every: int = 0, blur_sigma: float = 0.5, decorrelate: bool = True,
           seed: int = 0, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None, progress: bool = False) -> Tensor:
    """Optimise one image per objective and return them as (B, C, H, W) in [0, 1].

    Maximises, per image i, ``objectives[i] - l2 * mean(x_i^2) - tv * total_variation(img_i)``
    with Adam, where ``img`` is the image in [0, 1] and ``x = (img - mean) / std`` is the
    normalized model input (the L2 penalty acts in that normalized space, per pixel, so it does
    not grow with image size). Each step applies ``transforms`` (default ``standard_transforms``
    for the image size; pass ``[]`` for none) and runs the model only up to the deepest layer the
    objectives read. With ``blur_every > 0`` the image is blurred with ``blur_sigma`` pixels every
    that many steps. ``param`` is ``"fourier"`` (decorrelated 1/f spectrum, Lucid's default) or
    ``"pixel"``; ``decorrelate`` mixes colours by ImageNet's colour covariance (3 channels only).
    ``progress`` shows a bar over the steps.
    """
    _require_eval(model, "render")
    if not objectives:
        raise PipelineError("render needs at least one objective")
    if len(image_shape) != 3:
        raise PipelineError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    if steps < 0 or lr <= 0:
        raise PipelineError(f"steps must be >= 0 and lr > 0 (got steps={steps}, lr={lr})")
    builders = {"fourier": fourier_image, "pixel": pixel_image}
    if param not in builders:
        raise PipelineError(f"unknown parameterisation {param!r}: use 'fourier' or 'pixel'")

    ref = _model_ref(model)
    c, h, w = (int(v) for v in image_shape)
    g = torch.Generator().manual_seed(seed)
    params, image_fn, blur = builders[param](len(objectives), (c, h, w), g,
                                             decorrelate=decorrelate, device=ref.device)
    tfs = standard_transforms(min(h, w)) if transforms is None else list(transforms)
    norm = _normalizer(mean, std, c, ref)
    layers = set().union(*(o.layers for o in objectives))
    for name in layers:  # fail on a bad layer name before any work
        get_layer(model, name)
    opt = torch.optim.Adam(params, lr=lr)

    with torch.enable_grad():
        for step in tqdm(range(steps), desc="ascent", unit="step", disable=None if progress else True):
            img = image_fn()
            seen = img
            for t in tfs:
                seen = t(seen, g)
            x = norm(seen)
            score = _per_image_scores(objectives, truncated_forward(model, x, layers))
            loss = -score.sum()
            if l2:
                loss = loss + l2 * x.pow(2).flatten(1).mean(1).sum()
            if tv:
                loss = loss + tv * total_variation(img).sum()
            grads = torch.autograd.grad(loss, params)  # model parameters get no .grad
            for p, gr in zip(params, grads):
                p.grad = gr
            opt.step()
            if blur_every and (step + 1) % blur_every == 0:
                blur(blur_sigma)
    with torch.no_grad():
        return image_fn().detach()
