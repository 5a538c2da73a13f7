"""A corpus of malformed datasets (badkit.CASES), each with its expected outcome, run through the real
``pipeline.prepare.prepare`` and then through the training and evaluation datasets:

* ``error``: a DataError whose message names the item (file, id or line) - exit code 2 at the CLI;
* ``fixed``: prepared with the listed fix-ups, each counted in report.json with a message naming the item,
  and no other warning;
* ``ok``: prepared without any warning.

Whenever preparation succeeds, every image of both splits is loaded (badkit.check_loading): the decoded
size equals the size in the prepared json - the EXIF orientation is applied the same way by the size check
and by the loader - and boxes stay inside the input. The README table ("What is guaranteed") is generated
from the same CASES (guarantees.py).
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from badkit import CASES, INFO_CODES, check_loading, prepare_case
from testkit import PYTHON, REPO, subprocess_env

from pipeline.config import compose
from pipeline.data.dataset import DetectionDataset
from pipeline.data.validate import DataError
from pipeline.prepare import prepare

HERE = Path(__file__).resolve().parent
LOAD_IN_SUBPROCESS = {"yolo_non_utf8_file_name"}  # cv2.imread segfaulted on such names: keep pytest alive
LOADER = ("import json, sys; from pathlib import Path; from badkit import check_loading; "
          "from pipeline.config import compose; check_loading(compose(json.loads(sys.argv[1])), Path(sys.argv[2])); "
          "print('LOADED')")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input(case, tmp_path):
    root = tmp_path / "data"
    overrides = prepare_case(case, root)
    cfg = compose(overrides)
    if case.expect == "error":
        with pytest.raises(DataError) as err:
            if case.stage == "prepare":
                prepare(cfg)
            else:  # prepared with the base classes, then loaded for training with the case's config
                DetectionDataset(root / "prepared" / "train.json", cfg, train=True)
        assert re.search(case.detail, str(err.value), re.DOTALL), (case.detail, str(err.value))
        return

    report = prepare(cfg)
    counts = {i["code"]: i["count"] for i in report["issues"]}
    warnings = {i["code"] for i in report["issues"] if i["severity"] == "warning"}
    expected = dict(case.detail or {})
    assert {c: counts.get(c) for c in expected} == expected, report["issues"]
    assert warnings == {c for c in expected if c not in INFO_CODES}, report["issues"]
    examples = [ex for issue in report["issues"] if issue["code"] in expected for ex in issue["examples"]]
    for name in case.names:  # the messages name the item
        assert any(name in ex for ex in examples), (name, examples)
    prepared = root / "prepared"
    if case.name in LOAD_IN_SUBPROCESS:
        env = subprocess_env(PYTHONPATH=f"{HERE}:{REPO}")
        res = subprocess.run([PYTHON, "-c", LOADER, json.dumps(overrides), str(prepared)], check=False, env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "LOADED" in res.stdout, (res.returncode, res.stderr[-2000:])
        return
    metas = check_loading(cfg, prepared)
    if case.check is not None:
        case.check(metas)


def test_corpus_size_and_outcomes():
    kinds = {k: sum(c.expect == k for c in CASES) for k in ("error", "fixed", "ok")}
    assert len(CASES) >= 20 and all(kinds.values()), kinds
    assert len({c.name for c in CASES}) == len(CASES)
    assert all(c.expect != "error" or c.detail for c in CASES)


@pytest.mark.slow
def test_prepare_cli_reports_a_bad_dataset_in_one_line(tmp_path):
    case = next(c for c in CASES if c.name == "duplicate_image_ids")
    overrides = prepare_case(case, tmp_path / "data")
    res = subprocess.run([PYTHON, "-m", "pipeline.prepare", *overrides, f"hydra.run.dir={tmp_path / 'h'}"],
                         check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=subprocess_env())
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(case.detail, lines[0]), lines


def test_sixteen_bit_image_is_scaled_not_saturated(tmp_path):
    """16-bit PNG: the loader keeps the picture (value / 256) instead of clipping it to white."""
    import cv2

    from pipeline.data.transforms import read_image

    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "ramp.png"), ramp)
    img = read_image(tmp_path / "ramp.png")
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert int(img.max()) == int(ramp.max()) >> 8 and len(np.unique(img)) > 100
