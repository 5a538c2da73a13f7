"""Every entry point writes its messages to the run dir's log file too (README: "each with its own log file")."""
from __future__ import annotations

import subprocess

import pytest
from testkit import PYTHON, subprocess_env


@pytest.mark.slow
def test_entry_point_messages_reach_the_run_dir_log_file(tmp_path):
    # 4 + 2 built-in images: too few for every class to have boxes, so prepare warns (a known message)
    res = subprocess.run([PYTHON, "-m", "pipeline.prepare", "data.builtin.num_train=4", "data.builtin.num_val=2",
                          f"data.prepared_dir={tmp_path / 'p'}", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    warned = [ln for ln in res.stderr.splitlines() if "has no boxes in this split" in ln]
    assert warned, res.stderr[-3000:]
    log = (tmp_path / "run" / "prepare_rank0.log").read_text()
    assert log.count("has no boxes in this split") == len(warned), log
