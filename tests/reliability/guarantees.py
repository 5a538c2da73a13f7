"""The "What is guaranteed" section of README.md, generated from the reliability tests' own tables.

    python tests/reliability/guarantees.py           # print the section
    python tests/reliability/guarantees.py --write   # replace the section's body in README.md

test_guarantees.py fails when README.md differs from what this prints.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parents[1] / "README.md"
HEADING = "## What is guaranteed"
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]  # tests/: testkit

from badkit import CASES
from test_config_cli import CLI_CASES
from test_kill import KILLS_PER_SEED, SEEDS

from pipeline.faults import CKPT_PHASES

FIXES = {  # what prepare does for each report code
    "image_unreadable": "image dropped with its boxes", "image_missing": "image dropped with its boxes",
    "image_converted": "loaded as 3-channel 8-bit BGR (info)", "size_mismatch": "real size used, boxes clipped to it",
    "duplicate_file": "both kept, warned", "split_overlap": "kept, warned (val scores optimistic)",
    "bbox_nonpositive": "box dropped", "bbox_nonfinite": "box dropped", "bbox_malformed": "box dropped",
    "bbox_outside": "box dropped", "bbox_too_small": "box dropped", "bbox_clipped": "box clipped to the image",
    "unknown_category": "box dropped", "annotation_unknown_image": "annotation dropped",
    "class_not_in_config": "boxes of the unlisted class dropped", "class_without_boxes": "warned",
    "yolo_fields": "line dropped", "yolo_not_number": "line dropped", "yolo_class_range": "line dropped",
    "yolo_not_normalised": "warned, read as normalised", "yolo_orphan_label": "file ignored",
    "yolo_names_differ": "data.class_names used", "voc_no_size": "size read from the image file",
    "voc_parse_error": "image dropped", "voc_object_malformed": "object dropped",
    "voc_imageset_missing": "list entry skipped",
}


def _outcome(case) -> str:
    if case.expect == "ok":
        return "accepted, no warning; loads at the annotated size"
    if case.expect == "fixed":
        return "; ".join(f"{FIXES[code]} - counted as `{code}` x{n}" for code, n in case.detail.items())
    where = "`pipeline.prepare`" if case.stage == "prepare" else "the training loader"
    return f"refused by {where}, exit 2: `{_plain(case.detail)}`"


def _plain(regex: str) -> str:
    """A regex of the tests as readable text (drop escapes and wildcards)."""
    text = re.sub(r"\\(.)", r"\1", regex).replace(".*", " ... ").replace("|", "/")
    return re.sub(r"\s+", " ", text).strip()


def section() -> str:
    kinds = {k: sum(c.expect == k for c in CASES) for k in ("error", "fixed", "ok")}
    kills = len(SEEDS) * KILLS_PER_SEED
    rows = "\n".join(f"| {i} | {c.fmt} | {c.what} | {_outcome(c)} |" for i, c in enumerate(CASES, 1))
    cli = "; ".join(name for name, _, _ in CLI_CASES)
    return f"""
Each statement is a test in `tests/reliability/` (part of `make test`); the numbers are counted from the
tests' own tables by `python tests/reliability/guarantees.py --write`, and a test fails when this section is
stale. Faults are injected with test-only hooks (`NANODET_FAULT_*` variables, `pipeline/faults.py`; inert
unless set).

**Interrupted training loses nothing.** kill -9 at {kills} random moments over {len(SEEDS)} seeds (a random
time after a random step - landing in forward, backward, a checkpoint write or validation - and inside a
random phase of a random checkpoint write), plus one run killed in each of the {len(CKPT_PHASES)} phases of a
write ({", ".join(CKPT_PHASES)}: torn temporary file, complete temporary file, between the two renames,
after the rename), plus SIGTERM at a random step and during validation, plus a full disk (ENOSPC) in the
middle of a save: every resumed run ends with bit-identical model, EMA, optimizer, scaler and scheduler
state, the same best.pt and the same plot tables as the uninterrupted run. A checkpoint with one flipped
byte is caught by its CRC-32 (plain `torch.load` loads it silently) and the previous one is used, with a
warning; with no usable checkpoint the run stops with an error instead of silently starting over. Stale
temporary files of killed saves are removed.

**Clean stops.** SIGTERM: training finishes the step in flight (or the validation in flight), saves
last.pt and exits 143 with one line; `python -m pipeline.evaluate` exits 143 with one line and never leaves a partial
metrics.json (it is written last and atomically; an interrupted run leaves the previous complete outputs
or no metrics.json at all).

**Distributed (torchrun, gloo, 2 ranks).** A rank killed at a step: the other rank stops at once with one
line, torchrun names the dead rank, and `torchrun --max-restarts=1` (c10d rendezvous) resumes from
last.pt to the exact weights of an uninterrupted 2-rank run - each restart attempt uses its own store
prefix, so it never reads the dead attempt's keys. A hung rank: the others give up after
`train.dist_timeout_s` and torchrun reports the failure (bounded, not the 30 min default).

**Storage.** An output folder that cannot be written (train.out_dir, eval.out_dir, data.prepared_dir under a
file) is one `error:` line and exit 2 before any work; a full disk during a checkpoint names the file and
keeps the previous checkpoint intact.

**Security.** Checkpoints, official weights, `train.init_from` and `model.backbone.pretrained` are read
with `torch.load(weights_only=True)`; a file carrying a pickled payload is refused with a clear message
and the payload does not run (the test's control load with `weights_only=False` shows that it would).
YAML (configs, sweeps, data.yaml) goes through safe loaders; sweep expressions are parsed, not evaluated;
a static check of `pipeline/` finds no `shell=True`, `eval`/`exec`, unsafe `yaml.load`, pickle loads, or
`torch.load` without `weights_only=True`.

**Tracking.** W&B online with a key and a server that never answers falls back to offline within
`tracking.init_timeout_s`; the W&B service dying mid-run and an unwritable `tracking.dir` leave training
running untracked, with a warning. A crashing Ray trial is retried from its checkpoint and reported
(`tests/tune/test_tune.py::test_crashing_trial_is_retried_from_its_checkpoint_and_reported`).

**Configuration.** {len(CLI_CASES)} kinds of abuse at the real command line, each exit code 2 with one
`error:` line naming the key and no traceback: {cli}.

**Bad inputs.** {len(CASES)} malformed inputs: {kinds["error"]} refused with an error naming the item,
{kinds["fixed"]} fixed up and counted in `report.json`, {kinds["ok"]} accepted unchanged. Whenever preparation
succeeds, every image of both splits is then loaded for training and evaluation at the size written in
the prepared json.

| # | format | input | outcome |
|---|---|---|---|
{rows}
"""


def current() -> str:
    text = README.read_text()
    start = text.index(HEADING) + len(HEADING)
    end = text.find("\n## ", start)
    return text[start:end if end >= 0 else len(text)]


def write() -> None:
    text = README.read_text()
    start = text.index(HEADING) + len(HEADING)
    end = text.find("\n## ", start)
    README.write_text(text[:start] + "\n" + section() + text[end if end >= 0 else len(text):])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the section in README.md")
    if parser.parse_args().write:
        write()
        print(f"updated '{HEADING}' in {README}")
    else:
        print(section())
