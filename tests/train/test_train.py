"""End-to-end training on tiny data: artefacts, resume after SIGKILL, SIGTERM, non-finite steps, DDP, W&B.

All runs: built-in data (16 train / 8 val images, 64x64, 3 classes), 0.5x backbone with 32-channel
neck/head, strides [8, 16, 32], batch 4, CPU, one thread per process.
"""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from testkit import (
    assert_same_tensors,
    kill_rng,
    kill_seeds,
    read_csv_rows,
    run_metrics,
    train_cli,
    wandb_history,
)

from pipeline.config import compose, to_dict
from pipeline.faults import NAN_RANK_ENV as FAULT_RANK_ENV
from pipeline.faults import NAN_STEPS_ENV as FAULT_NAN_ENV
from pipeline.model.checkpoint import CheckpointError, load_checkpoint, load_model_for_inference
from pipeline.model.criterion import LOSS_KEYS as LOSS_TERMS
from pipeline.train import train
from pipeline.train.loop import NonFiniteLossError


def test_single_process_run_writes_all_artefacts(tiny, tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = compose(tiny.overrides(tiny_data, out))
    reports = []
    summary = train(cfg, report=lambda epoch, m: reports.append((epoch, m)))
    assert summary["stopped"] == "completed" and summary["steps"] == 8 and summary["epochs_completed"] == 2
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.json", "details.json", "plots/train_loss.csv",
                 "plots/val_map.csv"):
        assert (out / name).is_file(), name
    metrics = run_metrics(out)
    assert {"best", "final", "train", "best_map", "per_class_AP"} <= set(metrics)
    assert set(metrics["per_class_AP"]) == {"circle", "triangle", "square"}
    assert all(np.isfinite(metrics["train"][k]) for k in LOSS_TERMS)
    rows = (out / "plots" / "train_loss.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,loss_qfl") and len(rows) == 3
    assert len((out / "plots" / "val_map.csv").read_text().splitlines()) == 3
    assert [e for e, _ in reports] == [0, 1] and "mAP" in reports[-1][1]
    last = load_checkpoint(out / "last.pt")
    assert (last["epoch"], last["step"], last["epoch_step"]) == (2, 8, 0)
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "rng", "config", "tracking_run_id",
            "best_map", "nonfinite"} <= set(last)
    model, stored = load_model_for_inference(out / "best.pt", "cpu")
    assert not model.with_aux and stored.model == cfg.model
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 64 + 16 + 4, 3 + 32)

    # the same out_dir with another model is refused, naming the key (train.resume=auto)
    with pytest.raises(CheckpointError, match="model.neck.out_channels: 32 != 48"):
        train(compose(tiny.overrides(tiny_data, out, "model.neck.out_channels=48")))


def test_injected_nan_step_is_skipped_and_repeated_ones_stop(tiny, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_NAN_ENV, "2")
    summary = train(compose(tiny.overrides(tiny_data, tmp_path / "a", "train.epochs=1")))
    assert summary["nonfinite_skipped"] == 1 and summary["steps"] == 4
    ckpt = load_checkpoint(tmp_path / "a" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.dtype.is_floating_point)

    monkeypatch.setenv(FAULT_NAN_ENV, "1,2")
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps.*train.max_nonfinite=2"):
        train(compose(tiny.overrides(tiny_data, tmp_path / "b", "train.epochs=1", "train.max_nonfinite=2")))


def test_early_stopping_after_patience_validations_without_gain(tiny, tiny_data, tmp_path):
    # lr ~0: the weights (and so the val mAP) do not change, epoch 1 brings no gain -> stop after it
    summary = train(compose(tiny.overrides(tiny_data, tmp_path, "train.epochs=5", "train.patience=1",
                                           "train.lr=1e-12", "train.min_lr=0")))
    assert summary["stopped"] == "early_stop" and summary["epochs_completed"] == 2 and summary["best_epoch"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", kill_seeds((5,)))  # NANODET_KILL_SEED replays a printed seed
def test_sigkill_then_resume_equals_uninterrupted_run(tiny, tiny_data, tmp_path, seed):
    """Killed at a random step (after at least one step checkpoint, possibly mid-epoch and between two
    checkpoints), then resumed with train.resume=auto: the final last.pt holds exactly the tensors of an
    uninterrupted run (model, EMA, optimizer moments, scheduler, scaler)."""
    extra = ("train.epochs=5", "train.val_interval=2", "train.save_interval_steps=3")
    reference = tmp_path / "reference"
    train(compose(tiny.overrides(tiny_data, reference, *extra)))

    resumed = tmp_path / "resumed"
    kill_at = kill_rng(seed).randint(4, 17)  # 20 steps in all
    print(f"kill -9 after step {kill_at}")
    code, output, seen = train_cli(tiny.overrides(tiny_data, resumed, *extra), tmp_path, stop_at_step=kill_at,
                                   timeout=180)
    assert code == -signal.SIGKILL, f"run was not killed (exit {code}, last step {seen}):\n{output[-3000:]}"
    # (a kill between the two renames of a save leaves only last.pt.prev, which resume then uses)
    saved = resumed / "last.pt" if (resumed / "last.pt").exists() else resumed / "last.pt.prev"
    interrupted_at = load_checkpoint(saved)["step"]
    assert 3 <= interrupted_at < 20, (seed, kill_at, interrupted_at)
    summary = train(compose(tiny.overrides(tiny_data, resumed, *extra)))
    assert summary["steps"] == 20

    a, b = load_checkpoint(reference / "last.pt"), load_checkpoint(resumed / "last.pt")
    compared = sum(assert_same_tensors(a[k], b[k], k) for k in ("model", "ema", "optimizer", "scaler"))
    assert compared > 3 * len(a["model"])
    assert a["scheduler"] == b["scheduler"] and a["step"] == b["step"] == 20
    assert a["best_map"] == b["best_map"]
    for plot in ("val_map.csv", "train_loss.csv"):  # no duplicated or missing epochs, same epoch means
        assert (resumed / "plots" / plot).read_text() == (reference / "plots" / plot).read_text(), plot


@pytest.mark.slow
def test_sigterm_saves_a_loadable_last_checkpoint(tiny, tiny_data, tmp_path):
    out = tmp_path / "run"
    code, output, _ = train_cli(tiny.overrides(tiny_data, out, "train.epochs=20"), tmp_path, stop_at_step=3,
                                sig=signal.SIGTERM, timeout=180)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM at step" in output and "train.resume=auto" in output
    ckpt = load_checkpoint(out / "last.pt")
    assert 3 <= ckpt["step"] < 80
    assert ckpt["epoch"] * 4 + ckpt["epoch_step"] == ckpt["step"]  # the position inside the epoch is kept
    model, _ = load_model_for_inference(out / "last.pt", "cpu")
    assert not model.training


def _identical_image_dataset(root: Path) -> None:
    """4 train + 2 val copies of ONE grey 64x64 image with different boxes (1, 1, 1 and 5 boxes)."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    (root / "images").mkdir(parents=True)
    boxes = [[[8, 8, 30, 30]], [[30, 20, 26, 30]], [[4, 36, 24, 24]],
             [[2, 2, 20, 20], [36, 4, 24, 26], [6, 34, 28, 26], [34, 34, 26, 26], [20, 18, 24, 24]]]
    for split, ids in (("train", range(4)), ("val", range(2))):
        images, anns = [], []
        for i in ids:
            name = f"images/{split}_{i}.png"
            cv2.imwrite(str(root / name), cv2.merge([grey, grey, grey]))
            images.append({"id": i + 1, "file_name": name, "width": 64, "height": 64})
            for j, (x, y, w, h) in enumerate(boxes[i]):
                anns.append({"id": 10 * i + j + 1, "image_id": i + 1, "category_id": 1 + j % 3,
                             "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        cats = [{"id": k + 1, "name": n} for k, n in enumerate(["a", "b", "c"])]
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


@pytest.mark.slow
def test_two_process_gloo_losses_equal_single_process_on_the_global_batch(tiny, tmp_path):
    """DDP normalisation: 2 ranks x batch 2 vs 1 process x batch 4 over the same 4 samples.

    What is compared: the six first-step loss terms as logged (``plots/train_loss.csv``, epoch 0 = one
    step), i.e. the cross-rank MEAN of each rank's term, against the single-process term on the whole
    global batch. Each rank computes ``sum over its samples / normaliser`` where the normalisers (number
    of positives for QFL, sum of quality weights for GIoU/DFL) are cross-rank means (reduce_mean); so
    mean_r(S_r / mean_r(N_r)) = sum_r S_r / sum_r N_r, the single-process value, and DDP's gradient
    average matches the single-process gradient. The official local normaliser would give
    mean_r(S_r / N_r), which differs because the ranks hold unequal numbers of positives here (one
    rank always gets the 5-box image: 2 vs 6 boxes).
    Conditions that make the per-sample outputs identical in both layouts: the 4 images are copies of
    one grey image (BatchNorm batch statistics are then independent of how the batch is split; SyncBN
    is CUDA-only) and augmentation is the identity; the class-logit bias is raised (init_from) so the
    normalisers are > 1 and their clamp at 1 never acts. Rank 1 also gets a NaN loss at step 1: both
    ranks must skip that step, so the parameters stay those after step 0, equal to the single-process
    ones after its one step.
    The gradients themselves are compared by magnitude (relative error, every tensor) in
    test_ddp_gradients.py; the update check at the end only confirms that DDP's averaged step was taken.
    """
    from pipeline.model import build_model
    from pipeline.prepare import prepare
    from pipeline.train import train as train_fn

    _identical_image_dataset(tmp_path / "coco")
    no_aug = ["data.augment.scale=[1,1]", "data.augment.stretch=[1,1]", "data.augment.translate=0",
              "data.augment.flip=0", "data.augment.brightness=0", "data.augment.contrast=[1,1]",
              "data.augment.saturation=[1,1]"]
    base = [*tiny.model, "data.source=coco", f"data.root={tmp_path / 'coco'}", "data.train_ann=train.json",
            "data.val_ann=val.json", "data.class_names=[a,b,c]", "data.input_size=[64,64]", "data.num_workers=0",
            f"data.prepared_dir={tmp_path / 'prepared'}", "data.eval_batch_size=2", "train.device=cpu",
            "train.warmup_steps=5", "train.log_interval=1", "tracking.mode=disabled", "train.val_interval=1",
            f"train.init_from={tmp_path / 'init.pt'}", *no_aug,
            # NCHW: with channels_last, float32 gradients of this batch of identical images depend on the batch
            # split far more (up to 10% of the largest gradient vs 3e-7 in NCHW)
            "train.lr=0.002", "train.channels_last=false"]
    cfg = compose(base + ["data.batch_size=4", "train.epochs=1", f"train.out_dir={tmp_path / 'single'}"])
    prepare(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    state = model.state_dict()
    for key in state:
        if key.startswith("head.gfl_cls.") and key.endswith("bias") or key == "aux_head.gfl_cls.bias":
            state[key][:3] = 3.0  # sigmoid ~0.95: quality weights sum well above 1
    torch.save({"model": state, "ema": None, "config": to_dict(cfg)}, tmp_path / "init.pt")
    train_fn(cfg)

    env = tiny.env()
    env.update({FAULT_NAN_ENV: "1", FAULT_RANK_ENV: "1"})
    cmd = [tiny.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.train",
           *base, "data.batch_size=2", "train.epochs=2", "train.max_steps=2", "train.dist_timeout_s=120",
           f"train.out_dir={tmp_path / 'ddp'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    skipped = [ln for ln in output.splitlines() if "skipped on all ranks" in ln]
    assert len(skipped) == 2 and sum("[rank 1]" in ln for ln in skipped) == 1, skipped  # both ranks skipped

    def first_step(run: str) -> dict[str, float]:
        header, row = (tmp_path / run / "plots" / "train_loss.csv").read_text().splitlines()[:2]
        return {k: float(v) for k, v in zip(header.split(","), row.split(",")) if k in LOSS_TERMS}

    single, ddp = first_step("single"), first_step("ddp")
    assert set(single) == set(LOSS_TERMS)
    for term in LOSS_TERMS:
        assert ddp[term] == pytest.approx(single[term], rel=2e-5), (term, ddp[term], single[term])
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["nonfinite_skipped"] == 1
    # The one optimizer step each run made must be the same update (this checks that DDP averaged the gradients;
    # the normalisers are checked by the loss terms above). AdamW's first step moves each weight by about
    # lr * sign(grad), so where the true gradient is zero (e.g. a BatchNorm bias feeding another BatchNorm)
    # rounding noise can flip an element by up to 2 lr whatever the lr: compare the updates relative to the
    # step size. Measured: 0.05% of the weights differ by more than a tenth of a step, none by more than 2 steps.
    p_init = torch.load(tmp_path / "init.pt", weights_only=True)["model"]
    p_single = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    p_ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")["model"]
    names = [name for name, _ in build_model(cfg.model).named_parameters()]
    d_single = torch.cat([(p_single[n] - p_init[n]).flatten() for n in names])
    d_ddp = torch.cat([(p_ddp[n] - p_init[n]).flatten() for n in names])
    step = d_single.abs().max()
    assert step > 0 and (d_ddp - d_single).abs().max() <= 2.05 * step
    differ = (d_ddp - d_single).abs() > 0.1 * step
    assert differ.float().mean() < 5e-3, f"{int(differ.sum())} of {differ.numel()} weights got another update"


@pytest.mark.slow
def test_offline_wandb_run_holds_expected_keys_and_the_values_of_the_plots_and_metrics(tiny, tiny_data, tmp_path,
                                                                                     monkeypatch):
    """The offline W&B run read back (its history records): every step's loss terms and lr, and every
    validation's metrics, agree with plots/train_loss.csv (epoch means of the steps, last lr), plots/val_map.csv
    and the best figures of metrics.json. 3 epochs, no EMA and a low score threshold so that some mAP is > 0."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    wb, out = tmp_path / "wb", tmp_path / "run"
    train(compose(tiny.overrides(tiny_data, out, "train.epochs=3", "tracking.mode=offline", f"tracking.dir={wb}",
                                 "tracking.num_images=2", "train.ema=false", "eval.score_thr=0.001")))
    runs = list((wb / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run_file = next(runs[0].glob("run-*.wandb"))
    blob = run_file.read_bytes()
    for key in [f"train/{k}" for k in LOSS_TERMS] + ["train/lr", "val/mAP", "val/AP50", "val/per_class_AP",
                                                     "val/images", "model-"]:
        assert key.encode() in blob, key
    media = runs[0] / "files" / "media"
    assert len(list((media / "images" / "val").glob("images_*.png"))) == 2 * 3  # 2 images x 3 validations
    assert list((media / "metadata" / "boxes2D" / "val").glob("*.boxes2D.json"))
    assert list((media / "table" / "val").glob("per_class_AP_*.table.json"))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["tracking_run_id"] and ckpt["tracking_run_id"] in runs[0].name

    history = wandb_history(run_file)
    train_rows = read_csv_rows(out / "plots" / "train_loss.csv")
    val_rows = read_csv_rows(out / "plots" / "val_map.csv")
    assert [r["epoch"] for r in train_rows] == [r["epoch"] for r in val_rows] == [0, 1, 2]
    assert sorted(s for s, row in history.items() if "train/loss" in row) == list(range(1, 13))  # log_interval=1
    close = {"rel": 1e-5, "abs": 1e-9, "nan_ok": True}  # the CSVs keep 6 significant digits
    for r in train_rows:  # each CSV row: the means over its epoch's 4 logged steps, and the epoch's last lr
        last = int(r["step"])
        steps = range(last - 3, last + 1)
        for term in (*LOSS_TERMS, "loss"):
            logged = [history[s][f"train/{term}"] for s in steps]
            assert np.mean(logged) == pytest.approx(r[term], **close), (term, r["epoch"], logged, r[term])
        assert history[last]["train/lr"] == pytest.approx(r["lr"], **close), (r["epoch"], history[last]["train/lr"])
        assert [history[s]["train/epoch"] for s in steps] == [r["epoch"]] * 4
    evals = sorted(s for s, row in history.items() if "val/mAP" in row)
    assert evals == [int(r["step"]) for r in val_rows]
    for r in val_rows:
        row = history[int(r["step"])]
        assert row["epoch"] == r["epoch"]
        for key in set(r) - {"epoch", "step"}:
            assert row[f"val/{key}"] == pytest.approx(r[key], **close), (key, r["epoch"], row[f"val/{key}"], r[key])
    assert any(history[s]["val/mAP"] > 0 for s in evals), "all logged mAPs are 0: the comparison shows nothing"

    metrics = run_metrics(out)
    best = max(evals, key=lambda s: history[s]["val/mAP"])  # the first of equal maxima, as training keeps it
    assert metrics["best_map"] == history[best]["val/mAP"] and metrics["best_epoch"] == history[best]["epoch"]
    for key in ("mAP", "AP50", "AP75"):
        assert metrics["best"][key] == history[best][f"val/{key}"], key
    for term in (*LOSS_TERMS, "loss", "lr"):  # the last epoch's train figures
        assert metrics["train"][term] == pytest.approx(train_rows[-1][term], **close), term
