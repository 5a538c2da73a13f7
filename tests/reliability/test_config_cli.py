"""Configuration abuse at the real command line (`python -m pipeline.train ...` in a subprocess): wrong
types, unknown keys and options, syntax errors, impossible combinations. Each must end with exit code 2
and exactly one `error:` line naming the key - no traceback, no Hydra dump. (tests/foundation/test_config.py
covers compose(); this covers what a user at a shell sees.)
"""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from testkit import PYTHON, subprocess_env

# (case, overrides, text the one error line must contain)
CLI_CASES = [
    ("misspelled key", ["train.epcohs=3"], "Did you mean 'train.epochs'"),
    ("unknown top-level key", ["foo=1"], "Unknown config key 'foo'"),
    ("new key added with +", ["+train.newkey=1"], "Unknown config key 'train.newkey'"),
    ("text for an integer", ["train.epochs=many"], "'train.epochs'"),
    ("float for an integer", ["train.epochs=3.5"], "'train.epochs'"),
    ("list for an integer", ["data.batch_size=[1,2]"], "'data.batch_size'"),
    ("number for a list", ["data.input_size=320"], "'data.input_size'"),
    ("null for a required float", ["train.lr=null"], "'train.lr'"),
    ("unknown choice", ["train.amp=fp8"], "train.amp: 'fp8' is not one of"),
    ("unknown config-group option", ["model=nope"], "Unknown option 'nope' for config group 'model'"),
    ("unknown option in a list of options", ["experiment=[raccoon,nope]"],
     "Unknown option 'nope' for config group 'experiment'"),
    ("override syntax error", ["data.input_size=[64,"], "cannot parse the override"),
    ("strides not matching the neck levels", ["model.head.strides=[8,16,64]"], "model.head.strides"),
    ("reg_max 0", ["model.head.reg_max=0"], "model.head.reg_max: must be >= 1"),
    ("batch size 0", ["data.batch_size=0"], "data.batch_size: must be >= 1"),
    ("input size not divisible by 32", ["data.input_size=[200,200]"], "not divisible by the largest backbone stride"),
    ("class names vs num_classes", ["data.class_names=[a,b]"], "data.class_names / model.num_classes"),
    ("GroupNorm groups do not divide the aux width", ["model.aux_head.feat_channels=100"],
     "model.aux_head.feat_channels / model.aux_head.num_groups"),
    ("even kernel size", ["model.head.kernel_size=4"], "must be odd"),
    ("min_lr above lr", ["train.lr=0.001", "train.min_lr=0.01"], "train.lr / train.min_lr"),
    ("EMA decay 1", ["train.ema_decay=1.0"], "train.ema_decay"),
    ("zero epochs", ["train.epochs=0"], "train.epochs: must be >= 1"),
    ("negative loader workers", ["data.num_workers=-1"], "data.num_workers"),
    ("COCO source without a root", ["data.source=coco"], "data.root"),
    ("CUDA asked on a machine without it", ["train.device=cuda"], "CUDA is not available"),
    ("--params file missing", ["--params", "nope.yaml"], "--params nope.yaml: file not found"),
]


# Every case also runs in its own interpreter when listed here; the others go through the same entry
# function (pipeline.train's Hydra main, sys.argv and all) inside one extra interpreter, to keep start-up
# costs (~3 s each) down.
OWN_PROCESS = {"misspelled key", "text for an integer", "unknown config-group option", "override syntax error",
               "strides not matching the neck levels", "CUDA asked on a machine without it"}
# extra environment of an own-process case: on a GPU host the CUDA case hides the GPUs, so that it asks for
# CUDA on a machine without it there too (torch.cuda.is_available() is then False) instead of training
CASE_ENV = {"CUDA asked on a machine without it": {"CUDA_VISIBLE_DEVICES": ""}}
assert set(CASE_ENV) <= OWN_PROCESS, "a case with its own environment needs its own process"

DRIVER = """
import contextlib, io, json, sys
from pipeline.train.__main__ import run
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    sys.argv = ["pipeline.train", *argv]
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            import traceback
            traceback.print_exc(file=err)
            code = 1
    results[name] = [code, err.getvalue()]
print("RESULTS=" + json.dumps(results))
"""


def _common(cwd: Path) -> list[str]:
    return [f"hydra.run.dir={cwd / 'hydra'}", f"train.out_dir={cwd / 'run'}", f"data.prepared_dir={cwd / 'none'}"]


def _own_process(overrides: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    res = subprocess.run([PYTHON, "-m", "pipeline.train", *overrides, *_common(cwd)], check=False, cwd=cwd,
                         env=subprocess_env(**env),
                         capture_output=True, text=True, timeout=180)
    return res.returncode, res.stderr, res.stdout


def _shared_process(cases: dict[str, list[str]], cwd: Path) -> dict[str, tuple[int, str, str]]:
    argv = {name: [*overrides, *_common(cwd)] for name, overrides in cases.items()}
    res = subprocess.run([PYTHON, "-c", DRIVER, json.dumps(argv)], check=False, cwd=cwd,
                         env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULTS=")), None)
    assert line, res.stdout[-2000:] + res.stderr[-2000:]
    return {name: (code, err, "") for name, (code, err) in json.loads(line[len("RESULTS="):]).items()}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """(exit code, stderr, stdout) per case; two interpreters at a time."""
    root = tmp_path_factory.mktemp("cli")
    shared = {name: overrides for name, overrides, _ in CLI_CASES if name not in OWN_PROCESS}
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = pool.submit(_shared_process, shared, root)
        alone = {name: pool.submit(_own_process, overrides, root, CASE_ENV.get(name, {}))
                 for name, overrides, _ in CLI_CASES if name in OWN_PROCESS}
        results = together.result()
        results.update({name: f.result() for name, f in alone.items()})
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_configuration_is_one_clear_line_and_exit_code_2(cli_results, name, overrides, expected):
    code, stderr, stdout = cli_results[name]
    output = stdout + stderr
    assert code == 2, f"{overrides}: exit {code}\n{output[-2000:]}"
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output[-2000:]
    errors = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert expected in errors[0], errors[0]
