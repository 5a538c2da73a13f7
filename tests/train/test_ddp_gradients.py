"""DDP normalisation by magnitude: the all-reduced gradients and the logged loss terms of one real 2-rank gloo
step equal those of one process on the same global batch (float32, NCHW). See ddp_step.py for the step."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from ddp_step import run_step

from pipeline.model.criterion import LOSS_KEYS as LOSS_TERMS

# Measured (torch 2.14.1, CPU, 1 thread per process, two runs): overall relative gradient error 9e-8 and 3.2e-7,
# worst single tensor 5.6e-7 (backbone.conv1), loss terms 1.2e-7 relative. The deliberate breaks gave: loss scaled
# by the world size 1.0 (gradients), reduce_mean summing 0.5 (gradients), the local QFL normaliser 0.23 (loss_qfl),
# the local box normaliser 0.054 (loss_bbox): the thresholds sit 30x above the noise and 5000x below the breaks.
GRAD_OVERALL_TOL = 1e-5
GRAD_TENSOR_TOL = 1e-4
TERM_TOL = 1e-5


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed global batch of 4 images, 64x64: images 0-1 (rank 0's half) hold 4 boxes each, images 2-3
    (rank 1's half) one box each, so the ranks' loss normalisers (positives, sum of quality weights) differ
    several-fold and a per-rank normaliser would give another loss than the cross-rank one."""
    g = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(4, 3, 64, 64, generator=g)
    boxes = torch.zeros(4, 4, 4)
    labels = torch.zeros(4, 4, dtype=torch.int64)
    valid = torch.zeros(4, 4, dtype=torch.bool)
    layout = [[(4, 4, 28, 30), (34, 6, 60, 26), (8, 36, 26, 60), (36, 34, 58, 58)],
              [(2, 2, 40, 40), (40, 10, 62, 30), (10, 44, 30, 62), (44, 44, 62, 62)],
              [(12, 10, 52, 50)], [(6, 20, 30, 44)]]
    for i, rects in enumerate(layout):
        for j, (x1, y1, x2, y2) in enumerate(rects):
            label = (i + j) % 3
            images[i, label, y1:y2, x1:x2] += 1.5  # the object: a bright patch in a class-specific channel
            boxes[i, j] = torch.tensor([x1, y1, x2, y2], dtype=torch.float32)
            labels[i, j], valid[i, j] = label, True
    return {"images": images, "gt_boxes": boxes, "gt_labels": labels, "gt_valid": valid}


def _init_weights(tiny, batch: dict, path: Path) -> None:
    """Seeded weights; class-logit biases raised (sigmoid ~0.73, so both normalisers are well above their clamp
    at 1); BatchNorm running statistics set to the global batch's statistics (one train-mode pass with a
    cumulative average), which the step then uses in eval mode."""
    from pipeline.config import compose
    from pipeline.model import build_model

    torch.manual_seed(0)
    model = build_model(compose(list(tiny.model)).model, with_aux=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gfl_cls" in name and name.endswith("bias"):
                p[:3] = 1.0
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        model.forward_train(batch["images"], 0)
    torch.save(model.state_dict(), path)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; 0 when both are zero, inf when only b is."""
    diff, ref = float(torch.linalg.vector_norm(a - b)), float(torch.linalg.vector_norm(b))
    return diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))


@pytest.mark.slow
def test_two_rank_gradients_and_loss_terms_equal_single_process_by_magnitude(tiny, tmp_path):
    overrides = [*tiny.model, "data.input_size=[64,64]", "data.num_workers=0", "train.device=cpu",
                 "train.amp=off", "train.channels_last=false", "train.grad_clip=0", "train.log_interval=1",
                 "train.warmup_steps=5", "tracking.mode=disabled", f"train.out_dir={tmp_path / 'unused'}"]
    batch = _batch()
    torch.save(batch, tmp_path / "batch.pt")
    _init_weights(tiny, batch, tmp_path / "init.pt")

    single = run_step(tmp_path, overrides)
    assert single["world"] == 1
    cmd = [tiny.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("ddp_step.py")), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=tiny.env(), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["world"] == 2 and ddp["max_rank_difference"] == 0.0  # DDP left the same gradients on both ranks

    summary = compare_with_single(single, ddp, "2 ranks")
    print(json.dumps(summary))


def compare_with_single(single: dict, ddp: dict, who: str) -> dict:
    """Assert that a 2-rank step (``ddp``, from ddp_step.py or a Ray Train worker) is the single-process step on
    the same global batch: the precondition that the ranks' own normalisers differ, every logged loss term, and
    every parameter gradient by relative error (each tensor, and all of them together). Returns the numbers."""
    # precondition: the ranks' own normalisers differ, so only the cross-rank mean gives the single-process loss
    pos = [t["num_pos"] for t in ddp["local"]]
    assert min(pos) >= 2 and max(pos) >= 2 * min(pos), pos
    assert sum(pos) == single["local"][0]["num_pos"], (pos, single["local"])

    # every loss term as logged (cross-rank mean of the ranks' terms) equals the single-process term
    for term in (*LOSS_TERMS, "loss"):
        s, d = single["logged"][term], ddp["logged"][term]
        assert s > 0 and abs(d - s) <= TERM_TOL * s, f"{term}: {who} {d} vs 1 process {s} ({d / s:.4f}x)"

    # every parameter gradient by relative error, and all of them together
    names = list(single["grads"])
    assert names == list(ddp["grads"])
    worst = max(names, key=lambda n: _rel(ddp["grads"][n], single["grads"][n]))
    flat_s = torch.cat([single["grads"][n].flatten() for n in names])
    flat_d = torch.cat([ddp["grads"][n].flatten() for n in names])
    overall = _rel(flat_d, flat_s)
    ratio = float(flat_d.norm() / flat_s.norm())
    assert overall <= GRAD_OVERALL_TOL, f"gradients: relative error {overall:.3g} (norm ratio {ratio:.4f})"
    worst_rel = _rel(ddp["grads"][worst], single["grads"][worst])
    assert worst_rel <= GRAD_TENSOR_TOL, f"{worst}: relative error {worst_rel:.3g}"
    return {"loss": [single["logged"]["loss"], ddp["logged"]["loss"]], "grad_rel_error": overall,
            "worst_tensor": [worst, worst_rel], "num_pos": pos,
            "worst_term_ratio": max(abs(ddp["logged"][t] / single["logged"][t] - 1) for t in LOSS_TERMS)}
