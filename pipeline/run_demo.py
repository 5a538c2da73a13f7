"""`make run`: the whole DVC pipeline on the built-in dataset, then where to find everything.

Equivalent to `dvc repro` followed by a summary; kept as a module so the Makefile stays one line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARTEFACTS = [
    ("prepared data + report", "data/prepared/report.json"),
    ("training metrics (dvc metrics)", "runs/train/metrics.json"),
    ("training details (per-class AP, ...)", "runs/train/details.json"),
    ("training curves (dvc plots)", "runs/train/plots/"),
    ("best checkpoint (EMA)", "runs/train/best.pt"),
    ("evaluation metrics (dvc metrics)", "runs/evaluate/metrics.json"),
    ("evaluation details (per-class AP, ...)", "runs/evaluate/details.json"),
    ("PR curves, confusion matrix, predictions", "runs/evaluate/figures/"),
    ("ONNX model", "runs/export/model.onnx"),
    ("export metrics (dvc metrics)", "runs/export/metrics.json"),
    ("export verification report", "runs/export/export.json"),
]


def main() -> int:
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.time()
    rc = subprocess.run([dvc, "repro"], cwd=REPO, env=env, check=False).returncode
    if rc:
        print(f"dvc repro failed (exit {rc}); the stage output above says why. "
              "Completed stages are cached: fix the problem and run `make run` again.", file=sys.stderr)
        return rc
    print(f"\nPipeline finished in {time.time() - start:.0f} s. Artefacts:")
    for what, rel in ARTEFACTS:
        mark = "" if (REPO / rel).exists() else "  (missing)"
        print(f"  {what:42s} {rel}{mark}")
    metrics = REPO / "runs/evaluate/metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        print(f"\nValidation: mAP {m.get('mAP', float('nan')):.3f}  AP50 {m.get('AP50', float('nan')):.3f}")
    print("Compare experiments: dvc exp run -S model.head.reg_max=10 && dvc exp show;  plots: dvc plots show --json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
