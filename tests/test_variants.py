"""Object / background variants (Xiao et al. 2020) and the background-reliance table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.reliance.causal import causal_table, choose_partners, describe_rules
from pipeline.errors import PipelineError
from pipeline.methods.metrics import box_masks
from pipeline.methods.variants import (FILLS, VARIANTS, context_only, fill_image, make_variants,
                                       object_only, paste)

SIZE = 16
MIDDLE = (6, 6, 10, 10)  # x0, y0, x1, y1: where every object lies
CORNER = (0, 0, 4, 4)


# ---------------------------------------------------------------- variants on a tiny image

def tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 3x5x6 images with distinct pixel values and a different box each."""
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    objects = box_masks(torch.tensor([[1, 1, 3, 4], [2, 0, 6, 2]]), 5, 6)
    return x, objects


def test_object_only_and_context_only_follow_the_mask_exactly():
    x, objects = tiny()
    filled = torch.full_like(x, -7.0)
    inside = objects[:, None].expand_as(x)
    obj, ctx = object_only(x, objects, filled), context_only(x, objects, filled)
    assert torch.equal(obj[inside], x[inside]) and (obj[~inside] == -7).all()
    assert torch.equal(ctx[~inside], x[~inside]) and (ctx[inside] == -7).all()
    assert objects[0].sum() == 2 * 3 and objects[1].sum() == 4 * 2


def test_paste_puts_the_object_where_it_is_in_its_own_image():
    x, objects = tiny()
    background = torch.full_like(x, 100.0).flip(0) + torch.rand_like(x)
    out = paste(x, objects, background)
    for i in range(2):
        ys, xs = torch.nonzero(objects[i], as_tuple=True)
        assert torch.equal(out[i][:, ys, xs], x[i][:, ys, xs])
        assert torch.equal(out[i][:, ~objects[i]], background[i][:, ~objects[i]])


def test_make_variants_builds_the_four_in_order():
    x, objects = tiny()
    filled, same, rand = torch.zeros_like(x), torch.ones_like(x), torch.full_like(x, 2.0)
    out = make_variants(x, objects, filled, same, rand)
    assert tuple(out) == VARIANTS
    inside = objects[:, None].expand_as(x)
    for name, outside in [("object_only", 0.0), ("mixed_same", 1.0), ("mixed_rand", 2.0)]:
        assert torch.equal(out[name][inside], x[inside]) and (out[name][~inside] == outside).all()
    assert (out["context_only"][inside] == 0).all()


def test_constant_and_mean_fills():
    x = torch.randn(2, 3, 5, 6)
    assert (fill_image(x, "constant", constant=0.25) == 0.25).all()
    mean = torch.tensor([0.1, -0.2, 0.3])
    filled = fill_image(x, "mean", mean=mean)
    assert filled.shape == x.shape
    assert torch.equal(filled, mean.view(1, 3, 1, 1).expand_as(x))


def test_blur_keeps_a_constant_image_and_reduces_variance():
    flat = torch.full((1, 3, 12, 20), 0.7)
    assert torch.allclose(fill_image(flat, "blur", blur_sigma=2.0), flat, atol=1e-6)
    noisy = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(0))
    for sigma in (1.0, 10.0, 200.0):  # a large sigma clips the kernel to the image
        blurred = fill_image(noisy, "blur", blur_sigma=sigma)
        assert blurred.shape == noisy.shape
        assert blurred.var() < 0.5 * noisy.var()
    assert fill_image(noisy, "blur", blur_sigma=10.0).var() < fill_image(noisy, "blur", blur_sigma=1.0).var()


def test_fill_errors_name_the_choices():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(PipelineError, match="mean, blur, constant"):
        fill_image(x, "noise")
    with pytest.raises(PipelineError, match="mean"):
        fill_image(x, "mean")
    with pytest.raises(PipelineError, match="channel"):
        fill_image(x, "mean", mean=torch.zeros(2))
    assert FILLS == ("mean", "blur", "constant")


def test_masks_must_be_bool_and_match():
    x, objects = tiny()
    with pytest.raises(PipelineError, match="bool"):
        object_only(x, objects.float(), x)
    with pytest.raises(PipelineError, match="shape"):
        paste(x, objects, x[:, :2])


# ---------------------------------------------------------------- hand-set models

def region_model(regions: list[tuple[int, tuple[int, int, int, int]] | None], channels: int,
                 bias: float = 0.5) -> nn.Module:
    """A linear classifier whose logit j is the mean of channel c over box (x0, y0, x1, y1) for
    ``regions[j] = (c, box)``, or the constant ``bias`` for ``regions[j] = None``."""
    lin = nn.Linear(channels * SIZE * SIZE, len(regions))
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        for j, region in enumerate(regions):
            if region is None:
                lin.bias[j] = bias
                continue
            c, box = region
            w = torch.zeros(channels, SIZE, SIZE)
            w[c] = box_masks(torch.tensor([box]), SIZE, SIZE)[0].float()
            lin.weight[j] = (w / w.sum()).flatten()
    return nn.Sequential(nn.Flatten(), lin).eval()


def make_images(n: int, channels: int, object_channel: int, corner: bool, seed: int) -> torch.Tensor:
    """Dim noise, a bright object in the middle (on ``object_channel``), and optionally a less
    bright top-left corner on the same channel (so a class's own object outweighs another
    class's corner, and only a corner-reliant class moves with the background)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.rand(n, channels, SIZE, SIZE, generator=g)
    bright = 0.8 + 0.2 * torch.rand(n, 1, 1, generator=g)
    x0, y0, x1, y1 = MIDDLE
    x[:, object_channel, y0:y1, x0:x1] = bright
    if corner:
        x0, y0, x1, y1 = CORNER
        x[:, object_channel, y0:y1, x0:x1] = 0.7
    return x


def predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def test_corner_model_needs_the_background_and_middle_model_the_object():
    x = make_images(6, 1, 0, corner=True, seed=1)
    objects = box_masks(torch.tensor([MIDDLE] * 6), SIZE, SIZE)
    filled = fill_image(x, "constant", constant=0.0)
    corner = region_model([None, (0, CORNER)], channels=1)
    middle = region_model([None, (0, MIDDLE)], channels=1)
    obj, ctx = object_only(x, objects, filled), context_only(x, objects, filled)
    assert (predict(corner, x) == 1).all() and (predict(middle, x) == 1).all()
    assert (predict(corner, obj) == 0).all() and (predict(corner, ctx) == 1).all()
    assert (predict(middle, obj) == 1).all() and (predict(middle, ctx) == 0).all()


def test_causal_table_flags_the_class_decided_from_the_corner():
    classes, per_class, channels = 4, 5, 4
    # logit 0 reads class 0's corner, logits 1-3 read their object in the middle, logit 4 is a
    # constant "none of them" that wins when the evidence a class relies on is gone.
    model = region_model([(0, CORNER)] + [(c, MIDDLE) for c in range(1, classes)] + [None], channels)
    x = torch.cat([make_images(per_class, channels, c, corner=c == 0, seed=10 + c) for c in range(classes)])
    labels = np.repeat(np.arange(classes), per_class)
    objects = box_masks(torch.tensor([MIDDLE] * len(x)), SIZE, SIZE)
    filled = fill_image(x, "constant", constant=0.0)
    contexts = context_only(x, objects, filled)
    same, rand = choose_partners(labels, True, seed=0), choose_partners(labels, False, seed=0)
    assert (same >= 0).all() and (rand >= 0).all()
    variants = make_variants(x, objects, filled, contexts[same], contexts[rand])
    df = pd.DataFrame({"class_name": [f"c{c}" for c in labels], "label": labels,
                       "prediction": predict(model, x)}
                      | {name: predict(model, v) for name, v in variants.items()})

    table = causal_table(df)
    assert list(table["class_name"]) == ["c0", "c1", "c2", "c3", "(all)"]
    assert (table["accuracy"] == 1).all()
    assert list(table["flagged"]) == [True, False, False, False, False]
    assert list(table["object_only_retention"][:4]) == [0, 1, 1, 1]
    assert list(table["context_only_retention"][:4]) == [1, 0, 0, 0]
    assert list(table["bg_gap"][:4]) == [1, 0, 0, 0]  # only class 0 loses on another class's background
    assert "object_only retention 0.00, below 0.90" in table["reason"][0]
    assert "context_only retention 1.00, above 0.10" in table["reason"][0]
    assert (table["reason"][1:] == "").all()


# ---------------------------------------------------------------- partners

def test_choose_partners_respects_classes_and_seed():
    labels = np.array([3, 1, 3, 3, 1, 7, 1, 3, 1])  # class 7 has a single image
    same = choose_partners(labels, True, seed=5)
    other = choose_partners(labels, False, seed=5)
    idx = np.arange(len(labels))
    assert same[5] == -1
    has = same >= 0
    assert (labels[same[has]] == labels[has]).all() and (same[has] != idx[has]).all()
    assert (other >= 0).all() and (labels[other] != labels).all()
    assert np.array_equal(same, choose_partners(labels, True, seed=5))
    assert np.array_equal(other, choose_partners(labels, False, seed=5))
    draws = {tuple(choose_partners(labels, True, seed=s)) for s in range(20)}
    assert len(draws) > 1  # the seed matters


def test_choose_partners_edge_cases():
    assert (choose_partners(np.array([2, 2, 2]), False, seed=0) == -1).all()
    assert np.array_equal(choose_partners(np.array([0, 0]), True, seed=0), [1, 0])
    assert (choose_partners(np.array([4]), True, seed=0) == -1).all()
    labels = np.repeat(np.arange(50), 2)  # same=True with pairs: the partner is forced
    assert np.array_equal(choose_partners(labels, True, seed=3), np.arange(100) ^ 1)


# ---------------------------------------------------------------- the table by hand

def small_frame() -> pd.DataFrame:
    rows = [  # class_name, label, prediction, object_only, context_only, mixed_same, mixed_rand
        ("ant", 1, 1, 1, 0, 1, -1),
        ("cat", 0, 0, 0, 1, 0, 1),
        ("cat", 0, 0, 1, 1, 0, 0),
        ("eel", 2, 0, 0, 2, -1, 2),
        ("cat", 0, 0, 0, 0, -1, None),
        ("ant", 1, 0, 1, 1, 1, -1),
        ("cat", 0, 1, 0, 0, 1, 1),
    ]
    df = pd.DataFrame(rows, columns=["class_name", "label", "prediction", *VARIANTS])
    df["mixed_rand"] = df["mixed_rand"].astype("Int64")  # a missing partner as NA, too
    return df


def test_causal_table_numbers_by_hand():
    table = causal_table(small_frame())
    assert list(table.columns) == ["class_name", "images", "accuracy", "object_only_retention",
                                   "context_only_retention", "mixed_same", "mixed_rand", "bg_gap",
                                   "flagged", "reason"]
    assert list(table["class_name"]) == ["cat", "ant", "eel", "(all)"]  # by label, not by name
    assert list(table["images"]) == [4, 2, 1, 7]
    expected = {  # cat: 3 of 4 correct; ant: 1 of 2; eel: none
        "accuracy": [3 / 4, 1 / 2, 0, 4 / 7],
        "object_only_retention": [2 / 3, 1, math.nan, 3 / 4],
        "context_only_retention": [1 / 3, 0, math.nan, 1 / 4],
        "mixed_same": [2 / 3, 1, math.nan, 4 / 5],
        "mixed_rand": [1 / 3, math.nan, 1, 2 / 4],
        "bg_gap": [1 / 3, math.nan, math.nan, 4 / 5 - 2 / 4],
    }
    for col, values in expected.items():
        np.testing.assert_allclose(table[col].to_numpy(dtype=float), values, err_msg=col)
    assert not table["flagged"].any() and (table["reason"] == "").all()  # too few classes to compare


def test_causal_table_flags_only_classes_far_from_the_others():
    def frame(obj_hits: list[int], ctx_hits: list[int]) -> pd.DataFrame:
        rows = []  # ten correct images per class; hits of 10 stay on their label
        for c, (oh, ch) in enumerate(zip(obj_hits, ctx_hits)):
            for i in range(10):
                rows.append((f"k{c}", c, c, c if i < oh else 99, c if i < ch else 99, c, 99))
        return pd.DataFrame(rows, columns=["class_name", "label", "prediction", *VARIANTS])

    table = causal_table(frame([8, 9, 7, 8, 2], [1, 2, 1, 3, 2]))
    assert list(table["flagged"]) == [False, False, False, False, True, False]
    assert table["reason"][4] == "object_only retention 0.20, below 0.58 (the other classes' median minus the spread)"
    table = causal_table(frame([8, 9, 8, 8, 8], [1, 2, 9, 1, 2]))
    assert list(table["flagged"]) == [False, False, True, False, False, False]
    assert table["reason"][2].startswith("context_only retention 0.90, above ")
    assert (table.loc[table.index != 2, "reason"] == "").all()
    assert table["bg_gap"].iloc[-1] == 1.0
    # a min_gap wider than the distance flags nothing
    assert not causal_table(frame([8, 9, 7, 8, 2], [1, 2, 1, 3, 2]), min_gap=0.9)["flagged"].any()


def test_causal_table_names_missing_columns_and_rules_read_well():
    with pytest.raises(PipelineError, match="mixed_rand"):
        causal_table(small_frame().drop(columns="mixed_rand"))
    text = describe_rules(3.0, 0.1)
    assert "object_only" in text and "context_only" in text and "below" in text and "above" in text
    assert "3 x 1.4826" in text and "0.1" in text
