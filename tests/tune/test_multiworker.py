"""Multi-worker trials (``workers_per_trial: 2``): the Ray Train TorchTrainer a trial builds
(:func:`pipeline.tune.trial.torch_trainer`: 2 CPU workers, gloo) runs the project's one train step with the
cross-rank ``reduce_mean`` loss normalisers, and its loss terms and all-reduced gradients equal one process's
on the same global batch - the comparison of tests/train/test_ddp_gradients.py (same batch, weights, step and
tolerances), with Ray Train instead of torchrun setting up the process group.

The end-to-end sweep with 2 workers per trial is test_tune.py::test_multi_worker_trial_runs_ddp_through_ray_train.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from testkit import REPO, TINY_MODEL, subprocess_env

TRAIN_TESTS = REPO / "tests" / "train"
sys.path.insert(0, str(TRAIN_TESTS))  # the step and the comparison of the torchrun test, reused as they are
from ddp_step import run_step
from test_ddp_gradients import _batch, _init_weights, compare_with_single

# Ray starts, then the trial's TorchTrainer with 2 workers runs ddp_step.run_step on each: rank 0 saves ddp.pt.
RAY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from pipeline.tune import driver
    from pipeline.tune.trial import torch_trainer

    work, ray_tmp, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])

    def loop(config):
        import ray.train
        from ddp_step import run_step  # on the workers' PYTHONPATH
        ctx = ray.train.get_context()
        print(f"worker rank {ctx.get_world_rank()} of {ctx.get_world_size()}", flush=True)
        run_step(Path(config["work"]), config["overrides"])

    driver.init_ray(driver.Args(sweep="multiworker"), ray_tmp)
    import ray
    try:
        trainer = torch_trainer(loop, {"work": str(work), "overrides": overrides}, workers=2,
                                resources={"cpu": 1, "gpu": 0}, timeout_s=120, storage=work / "storage")
        trainer.fit()
    finally:
        ray.shutdown()
""")


@pytest.mark.slow
def test_two_worker_trial_step_equals_one_process_on_the_same_global_batch(tmp_path):
    overrides = [*TINY_MODEL, "data.input_size=[64,64]", "data.num_workers=0", "train.device=cpu",
                 "train.amp=off", "train.channels_last=false", "train.grad_clip=0", "train.log_interval=1",
                 "train.warmup_steps=5", "tracking.mode=disabled", f"train.out_dir={tmp_path / 'unused'}"]
    batch = _batch()
    torch.save(batch, tmp_path / "batch.pt")
    _init_weights(SimpleNamespace(model=TINY_MODEL), batch, tmp_path / "init.pt")
    single = run_step(tmp_path, overrides)
    assert single["world"] == 1

    ray_tmp = Path(tempfile.mkdtemp(prefix="rw-"))  # Ray's socket paths must stay under 107 bytes
    env = subprocess_env(PYTHONPATH=f"{REPO}:{TRAIN_TESTS}", RAY_TMPDIR=str(ray_tmp))
    try:
        proc = subprocess.run([sys.executable, "-c", RAY_SCRIPT, str(tmp_path), str(ray_tmp), json.dumps(overrides)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "worker rank 0 of 2" in output and "worker rank 1 of 2" in output, output[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["world"] == 2 and ddp["max_rank_difference"] == 0.0  # DDP left the same gradients on both ranks

    print(json.dumps(compare_with_single(single, ddp, "2 Ray workers")))
