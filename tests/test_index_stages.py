"""The extract, index and query stages end to end: correctness against a direct forward pass,
incremental re-runs, kill-and-resume, sharded equality and clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.data.images import images_to_tensor
from pipeline.runtime import Context
from pipeline.stages import run_stages
from tests.helpers import assert_same_store, store_state

ROOT = Path(__file__).resolve().parents[1]


def test_topk_matches_a_direct_forward_pass(make_cfg) -> None:
    summary = run_stages(make_cfg(["stage=[extract,index]"]))
    assert summary["stages"]["extract"]["processed"] == 120
    ctx = Context(make_cfg(["stage=query"]))
    store = ctx.store()
    recs = store.images().sort_values("row_id")
    x = images_to_tensor(recs["path"].tolist(), ctx.model.transform)
    grabbed = {}
    layer = "features.relu4"
    handle = dict(ctx.model.module.named_modules())[layer].register_forward_hook(
        lambda m, i, o: grabbed.setdefault("out", o))
    with torch.no_grad():
        logits = ctx.model.module(x)
    handle.remove()
    out = grabbed["out"]
    assert (logits.argmax(1).numpy() == recs["prediction"].to_numpy()).all()
    # three channels whose values spread (a channel dead on most images ties at 0, in any order)
    spread = out.flatten(2).amax(2).std(0)
    for channel in torch.argsort(spread, descending=True)[:3].tolist():
        spatial_max = out[:, channel].flatten(1).max(1).values
        want = recs["image_id"].to_numpy()[torch.argsort(spatial_max, descending=True)[:5].numpy()]
        got = store.topk(layer, channel, 5)
        assert list(got["image_id"]) == list(want)
        np.testing.assert_allclose(got["value"], spatial_max.sort(descending=True).values[:5], rtol=1e-5)
        mean = out[:, channel].flatten(1).mean(1)
        got_mean = store.topk(layer, channel, 3, by="mean")
        assert list(got_mean["image_id"]) == list(recs["image_id"].to_numpy()[torch.argsort(mean, descending=True)[:3]])
    # nearest neighbours of an image under cosine on pooled vectors
    pooled = out.mean((2, 3))
    pooled = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = pooled @ pooled[0]
    want = recs["image_id"].to_numpy()[torch.argsort(sims, descending=True)[1:4].numpy()]
    got = store.neighbours(layer, recs["image_id"].iloc[0], 3, metric="cosine")
    assert list(got["image_id"]) == list(want)


def test_query_stage_writes_table_and_grid(make_cfg) -> None:
    run_stages(make_cfg(["stage=[extract,index]"]))
    s = run_stages(make_cfg(["stage=query", "query.channel=3", "query.k=4", "query.format=csv"]))["stages"]["query"]
    table = pd.read_csv(s["table"])
    assert len(table) == 4 and table["value"].is_monotonic_decreasing
    grid = Image.open(s["grid"])
    assert grid.width > grid.height  # one row of images, one of receptive-field crops
    d = run_stages(make_cfg(["stage=query", "query.type=direction", "query.class_a=1", "query.class_b=7"]))
    assert d["stages"]["query"]["rows"] == 5
    image = table["image_id"].iloc[0]
    n = run_stages(make_cfg(["stage=query", "query.type=neighbours", f"query.image={image}", "query.k=3"]))
    assert n["stages"]["query"]["rows"] == 3
    t = run_stages(make_cfg(["stage=query", "query.type=neurons", f"query.image={table['path'].iloc[0]}"]))
    assert t["stages"]["query"]["rows"] == 5


def test_errors_name_the_problem_and_the_fix(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="stage=extract"):
        run_stages(make_cfg(["stage=query"]))
    with pytest.raises(PipelineError, match="features.conv4"):
        run_stages(make_cfg(["stage=extract", "extract.layers=[features.conv5]"]))
    run_stages(make_cfg(["stage=[extract,index]"]))
    with pytest.raises(PipelineError, match=r"0\.\.127"):
        run_stages(make_cfg(["stage=query", "query.channel=128"]))
    with pytest.raises(PipelineError, match="features.relu4"):
        run_stages(make_cfg(["stage=query", "query.layer=features.relu9"]))
    # a store built with another model is detected
    ctx = Context(make_cfg(["stage=query"]))
    other = ctx.cache.root / "store" / ("0" * 64)
    ctx.store().root.rename(other)
    from pipeline.store import ActivationStore
    with pytest.raises(PipelineError, match="another model"):
        ActivationStore.open(other, "0" * 64)


def _folder_dataset(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = str(i % 3)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{i:03d}.png")


def test_incremental_rerun_processes_only_new_and_changed(make_cfg, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _folder_dataset(folder, 12)
    over = ["stage=[extract,index]", "data=imagefolder", f"data.path={folder}"]
    first = run_stages(make_cfg(over))["stages"]["extract"]
    assert first["processed"] == 12
    again = run_stages(make_cfg(over))["stages"]["extract"]
    assert again["processed"] == 0 and again["skipped"] == 12
    removed = folder / "0" / "000.png"
    removed_id = __import__("hashlib").sha256(removed.read_bytes()).hexdigest()
    removed.unlink()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(folder / "1" / "001.png")  # changed content
    Image.new("RGB", (40, 40), (0, 255, 0)).save(folder / "2" / "new_a.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(folder / "2" / "new_b.png")
    third = run_stages(make_cfg(over))["stages"]["extract"]
    assert third["processed"] == 3 and third["n_images"] == 13
    ctx = Context(make_cfg(["data=imagefolder", f"data.path={folder}"]))
    store = ctx.store()
    assert removed_id not in set(store.images()["image_id"])
    layer = store.layers()[-1]
    for c in range(store.channels(layer)):
        assert removed_id not in set(store.topk(layer, c, 13)["image_id"])
    assert removed_id not in set(store.neighbours(layer, str(folder / "1" / "004.png"), 12)["image_id"])


def _extract_cmd(outputs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "stage=extract", f"paths.outputs={outputs}", "++data.n_train=80",
            "++data.n_test=40", "train.epochs=1", "progress=false", "device=cpu", "extract.part_size=16", *extra]


@pytest.mark.slow
def test_killed_extract_resumes_to_the_same_store(make_cfg, tmp_path: Path) -> None:
    run_stages(make_cfg(["stage=train"]))  # the model is trained once, outside the killed runs
    reference = Context(make_cfg(["stage=extract"]))
    run_stages(make_cfg(["stage=extract"]))
    want = store_state(reference)
    import shutil
    shutil.rmtree(reference.store().root)
    for point in ("part_written:3", "journal_written:5", "finalize_staged:1", "finalize_applying:1"):
        env = dict(os.environ, PIPELINE_STORE_CRASH_AT=point)
        proc = subprocess.run(_extract_cmd(tmp_path), env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        done = subprocess.run(_extract_cmd(tmp_path), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert_same_store(store_state(Context(make_cfg(["stage=extract"]))), want)
        shutil.rmtree(reference.store().root)


@pytest.mark.slow
def test_two_shard_joblib_multirun_equals_a_single_run(make_cfg, tmp_path: Path) -> None:
    run_stages(make_cfg(["stage=train"]))
    cmd = _extract_cmd(tmp_path, "shard=0,1", "num_shards=2", "hydra/launcher=local_joblib")
    proc = subprocess.run([*cmd[:3], "-m", *cmd[3:]], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_stages(make_cfg(["stage=index"]))
    sharded = store_state(Context(make_cfg(["stage=query"])))
    single_out = tmp_path / "single"
    single_out.mkdir()
    from tests.helpers import compose_config
    cfg = compose_config(single_out, ["stage=[extract,index]", f"paths.cache={tmp_path / 'cache_single'}",
                                      f"paths.outputs={single_out}"])
    # reuse the same trained model: copy the checkpoint cache
    import shutil
    shutil.copytree(tmp_path / "cache" / "models", tmp_path / "cache_single" / "models")
    run_stages(cfg)
    assert_same_store(store_state(Context(cfg)), sharded)
