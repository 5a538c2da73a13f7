"""kill -9 at random moments and inside checkpoint writes: the resumed run ends with exactly the weights of
an uninterrupted run, and a torn or corrupt checkpoint is detected and skipped, never loaded silently.

(tests/train/test_train.py has the single SIGKILL-between-steps case; these extend it to several seeds, to
every phase of a checkpoint write via ``pipeline.faults`` and to bit rot in a finished file.)
"""
from __future__ import annotations

import signal
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from relkit import STEPS_PER_EPOCH, TOTAL_STEPS, assert_same_final_state, tiny_overrides
from testkit import kill_rng, kill_seeds, subprocess_env, train_cli

from pipeline.config import compose
from pipeline.faults import CKPT_ENV, CKPT_PHASES
from pipeline.model.checkpoint import CheckpointError, load_checkpoint
from pipeline.train import train
from pipeline.train.resume import find_resume_checkpoint

SEEDS = (0, 1, 2)  # the default; NANODET_KILL_SEED=5 (or 5,9) replays other seeds
KILLS_PER_SEED = 2  # one from outside at a random time, one inside a random phase of a random save


def test_kill_seeds_are_printed_and_replayable(monkeypatch, capsys):
    """The random kill moments come from a seed that is printed and can be set again (NANODET_KILL_SEED)."""
    monkeypatch.delenv("NANODET_KILL_SEED", raising=False)
    assert kill_seeds(SEEDS) == SEEDS
    monkeypatch.setenv("NANODET_KILL_SEED", "5, 9")
    assert kill_seeds(SEEDS) == (5, 9)
    monkeypatch.setenv("NANODET_KILL_SEED", "five")
    with pytest.raises(ValueError, match="NANODET_KILL_SEED='five'"):
        kill_seeds(SEEDS)
    draws = [kill_rng(9).randint(1, 1000) for _ in range(2)]
    assert draws[0] == draws[1]  # the same seed gives the same kill moment
    assert capsys.readouterr().out.count("random kill seed 9 (replay: NANODET_KILL_SEED=9)") == 2


def _temps(out: Path) -> list[Path]:
    return sorted(out.glob(".*.tmp.*"))


def assert_consistent_after_kill(out: Path, cfg) -> int | None:
    """Every visible checkpoint is complete (CRC-checked); returns the step a resume would start from."""
    for path in [*out.glob("*.pt"), *out.glob("*.pt.prev")]:
        load_checkpoint(path)  # raises CheckpointError on a torn or corrupt file
    found = find_resume_checkpoint(cfg)
    return None if found is None else int(found[1]["step"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", kill_seeds(SEEDS))
def test_kill9_at_random_moments_then_resume_gives_identical_weights(seed, tiny_data, reference_run, tmp_path):
    rng = kill_rng(seed)
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, out)
    cfg = compose(overrides)

    # kill 1, from outside: a random time after a random step's log line, so it lands anywhere (forward,
    # backward, the step checkpoint, validation, best.pt)
    step, delay = rng.randint(1, TOTAL_STEPS - 4), rng.uniform(0.0, 0.3)
    print(f"kill 1: {delay:.3f} s after step {step}")
    code, output, seen = train_cli(overrides, tmp_path, stop_at_step=step, delay_s=delay)
    assert code == -signal.SIGKILL, f"seed {seed}: not killed (exit {code}, step {seen}):\n{output[-3000:]}"
    first = assert_consistent_after_kill(out, cfg)
    assert first is None or first <= seen + 1, (seed, first, seen)

    # kill 2, from inside: a random phase of a random checkpoint write of the resumed run
    phase, index = rng.choice(CKPT_PHASES), rng.randint(1, 4)
    print(f"kill 2: phase {phase} of save {index}")
    code, output, _ = train_cli(overrides, tmp_path, env=subprocess_env(**{CKPT_ENV: f"{phase}:{index}"}))
    assert code == -signal.SIGKILL, f"seed {seed}: fault {phase}:{index} did not fire (exit {code}):\n{output[-3000:]}"
    if first is not None:
        assert f"resumed from {out}" in output
    second = assert_consistent_after_kill(out, cfg)
    assert second is not None and second >= (first or 0), (seed, first, second)

    summary = train(cfg)
    assert summary["steps"] == TOTAL_STEPS and summary["stopped"] == "completed"
    assert_same_final_state(reference_run, out)
    assert not _temps(out), "temporary files of killed saves were left behind"


@pytest.mark.slow
def test_kill9_in_every_phase_of_a_checkpoint_write(tiny_data, reference_run, tmp_path, pipeline_log):
    """One run killed four times, each time in its 2nd save, at each phase in turn; the state on disk is
    checked after every kill, then the run is finished and compared with the uninterrupted one."""
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, out)
    cfg = compose(overrides)

    def kill_at(phase: str) -> str:
        code, output, _ = train_cli(overrides, tmp_path, env=subprocess_env(**{CKPT_ENV: f"{phase}:2"}))
        assert code == -signal.SIGKILL, f"{phase}: exit {code}\n{output[-3000:]}"
        return output

    # partial: the 2nd save (step 2) is torn in its temporary file; last.pt still holds step 1
    kill_at("partial")
    (torn,) = _temps(out)
    assert torn.name.startswith(".last.pt.tmp.")
    with pytest.raises(Exception):  # noqa: B017 - torch itself refuses a truncated zip too
        torch.load(torn, weights_only=True)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(torn)
    assert load_checkpoint(out / "last.pt")["step"] == 1 and not (out / "last.pt.prev").exists()
    assert find_resume_checkpoint(cfg)[1]["step"] == 1

    # written: resumed at step 1; step 2 saved, step 3 complete in the temp file but never renamed
    output = kill_at("written")
    assert "resumed from" in output and "step 1" in output
    (complete,) = _temps(out)
    assert complete != torn and load_checkpoint(complete)["step"] == 3  # the torn one was cleaned up
    assert load_checkpoint(out / "last.pt")["step"] == 2 and load_checkpoint(out / "last.pt.prev")["step"] == 1

    # swapped: killed between the two renames of the step-4 save: last.pt is missing, .prev holds step 3
    kill_at("swapped")
    assert not (out / "last.pt").exists() and load_checkpoint(out / "last.pt.prev")["step"] == 3
    path, ckpt = find_resume_checkpoint(cfg)
    assert path.name == "last.pt.prev" and ckpt["step"] == 3
    assert any("missing" in r.getMessage() and "previous checkpoint" in r.getMessage() for r in pipeline_log.records)

    # renamed: resumed from .prev (step 3); its 2nd save is best.pt after epoch 0's validation, killed
    # after the rename: best.pt is complete, last.pt holds the end of epoch 0
    kill_at("renamed")
    assert not _temps(out)
    last = load_checkpoint(out / "last.pt")
    assert (last["step"], last["epoch"], last["epoch_step"]) == (STEPS_PER_EPOCH, 0, STEPS_PER_EPOCH)
    assert load_checkpoint(out / "best.pt")["epoch"] == 0

    summary = train(cfg)
    assert summary["steps"] == TOTAL_STEPS
    assert_same_final_state(reference_run, out)
    assert not _temps(out)


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor record of a torch.save zip (bit rot)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        where = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        fh.seek(where)
        byte = fh.read(1)[0]
        fh.seek(where)
        fh.write(bytes([byte ^ 0x10]))


@pytest.mark.slow
def test_bit_rot_in_last_checkpoint_is_detected_and_the_previous_one_used(tiny_data, reference_run, tmp_path,
                                                                         pipeline_log):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, out)
    cfg = compose(overrides)
    code, output, _ = train_cli(overrides, tmp_path, env=subprocess_env(**{CKPT_ENV: "renamed:3"}))
    assert code == -signal.SIGKILL, output[-3000:]
    good = load_checkpoint(out / "last.pt")
    assert good["step"] == 3
    flip_tensor_byte(out / "last.pt")

    silently = torch.load(out / "last.pt", weights_only=True)  # what plain torch.load would do: no error...
    differs = [k for k in good["model"] if not torch.equal(good["model"][k], silently["model"][k])]
    differs += [k for k in good["ema"] if not torch.equal(good["ema"][k], silently["ema"][k])]
    assert differs or silently["optimizer"] != good["optimizer"], "the flipped byte changed nothing?"
    with pytest.raises(CheckpointError, match="CRC-32"):  # ...while load_checkpoint refuses it
        load_checkpoint(out / "last.pt")

    # both files rotten: an error naming them, never a silent fresh start
    both = tmp_path / "both"
    both.mkdir()
    for name in ("last.pt", "last.pt.prev"):
        (both / name).write_bytes((out / name).read_bytes())
    flip_tensor_byte(both / "last.pt.prev")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*CRC-32.*CRC-32"):
        train(compose(tiny_overrides(tiny_data, both)))

    summary = train(cfg)  # resumes from last.pt.prev (step 2) with a warning naming the CRC failure
    assert any("CRC-32" in r.getMessage() and "previous checkpoint" in r.getMessage() for r in pipeline_log.records)
    assert summary["steps"] == TOTAL_STEPS
    assert_same_final_state(reference_run, out)
