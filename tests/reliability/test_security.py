"""Untrusted files never run code: checkpoints and official weights are read with weights_only=True, a
pickled payload is refused with a clear message and does NOT execute (a control load shows that it would),
YAML is parsed with safe loaders, sweep expressions are parsed, not evaluated, and no shell is spawned.
"""
from __future__ import annotations

import ast
import pathlib
from pathlib import Path

import pytest
import torch
import yaml
from relkit import tiny_overrides
from testkit import REPO, run_cli

from pipeline.config import compose, to_dict
from pipeline.model.checkpoint import CheckpointError, load_checkpoint

PIPELINE = REPO / "pipeline"


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def evil_checkpoint(path: Path, marker: Path, cfg=None) -> Path:
    """A file that looks like one of ours (weights, config) with a payload in one entry."""
    from pipeline.model import build_model

    cfg = cfg or compose(tiny_overrides(path.parent, path.parent))
    state = build_model(cfg.model).state_dict()
    torch.save({"model": state, "ema": state, "config": to_dict(cfg), "epoch": 0, "step": 1, "optimizer": {},
                "scheduler": {}, "extra": Payload(marker)}, path)
    return path


def test_the_payload_is_live_when_unpickled_unsafely(tmp_path):
    """Control: the same file loaded with weights_only=False runs the payload."""
    marker = tmp_path / "control_marker"
    evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_payload_is_refused_on_every_in_process_load_path(tmp_path):
    from pipeline.model import build_model
    from pipeline.model.checkpoint import load_model_for_inference, load_weights_for_finetune
    from pipeline.model.official import OfficialWeightsError, read_checkpoint
    from pipeline.model.shufflenetv2 import PretrainedWeightsError
    from pipeline.train.resume import find_resume_checkpoint

    marker = tmp_path / "marker"
    cfg = compose(tiny_overrides(tmp_path, tmp_path / "run"))
    evil = evil_checkpoint(tmp_path / "evil.pt", marker, cfg)
    with pytest.raises(CheckpointError, match=f"{evil}.*unsafe pickled payload"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="unsafe pickled payload"):
        load_model_for_inference(evil)  # evaluate / predict / export
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(evil.read_bytes())
    with pytest.raises(CheckpointError, match="no usable checkpoint.*unsafe pickled payload"):
        find_resume_checkpoint(cfg)  # train.resume=auto
    pth = tmp_path / "official.pth"
    pth.write_bytes(evil.read_bytes())
    with pytest.raises(OfficialWeightsError, match="pickled Python objects"):
        read_checkpoint(pth)  # official NanoDet weights
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_weights_for_finetune(build_model(cfg.model), pth)  # train.init_from
    with pytest.raises(PretrainedWeightsError, match="pickled Python objects"):
        build_model(compose([*tiny_overrides(tmp_path, tmp_path), f"model.backbone.pretrained={pth}"]).model)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("entry, key", [("pipeline.evaluate", "eval.checkpoint"),
                                        ("pipeline.train", "model.backbone.pretrained")])
def test_payload_is_refused_at_the_command_line(entry, key, tiny_data, tmp_path):
    marker = tmp_path / "marker"
    evil = evil_checkpoint(tmp_path / "evil.pth", marker)
    overrides = [*tiny_overrides(tiny_data, tmp_path / "run"), f"{key}={evil}", f"hydra.run.dir={tmp_path / 'h'}"]
    code, output, _ = run_cli(["-m", entry, *overrides], tmp_path)
    assert code == 2 and "Traceback" not in output, output[-3000:]
    errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and str(evil) in errors[0] and "pickled" in errors[0], errors
    assert not marker.exists()


def test_yaml_tags_in_configs_sweeps_and_dataset_files_do_not_run(tmp_path):
    from pipeline.data.formats import yolo_class_names
    from pipeline.data.validate import DataError, Issues
    from pipeline.tune.space import SweepError, load_sweep

    marker = tmp_path / "marker"
    tag = f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]"
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.yaml").write_text(f"train:\n  epochs: {tag}\n")
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):  # Hydra's safe loader
        compose([], config_dir=conf)
    (tmp_path / "sweep.yaml").write_text(f"metric: mAP\nspace:\n  train.lr: {tag}\n")
    with pytest.raises(SweepError):
        load_sweep(str(tmp_path / "sweep.yaml"))
    (tmp_path / "data.yaml").write_text(f"names: {tag}\n")
    with pytest.raises(DataError, match="not valid YAML"):
        yolo_class_names(tmp_path, [], Issues())
    assert not marker.exists()


def test_sweep_expressions_are_parsed_not_evaluated(tmp_path):
    from pipeline.tune.space import SweepError, load_sweep

    marker = tmp_path / "marker"
    (tmp_path / "sweep.yaml").write_text(
        "metric: mAP\nspace:\n  model.neck.out_channels: {choice: [32, 64]}\n"
        f"derived:\n  model.aux_head.feat_channels: \"__import__('pathlib').Path('{marker}').touch()\"\n")
    with pytest.raises(SweepError, match="nothing else is evaluated"):
        load_sweep(str(tmp_path / "sweep.yaml"))
    assert not marker.exists()


# ------------------------------------------------------------------------------ static source check
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
UNSAFE_NAMES = {"eval", "exec", "UnsafeLoader", "FullLoader", "Loader"}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Places in ``source`` that could run untrusted code: shell=True, eval/exec, yaml.load & co, pickle/marshal
    loads, os.system/popen, and torch.load without a literal weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Name) and node.id in UNSAFE_NAMES and isinstance(node.ctx, ast.Load):
            found.append(f"{where}: {node.id}")
        if isinstance(node, ast.Attribute) and node.attr in UNSAFE_NAMES and node.attr != "eval":
            found.append(f"{where}: .{node.attr}")  # yaml.Loader, yaml.FullLoader... (model.eval() is fine)
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{where}: shell=")
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner, attr = func.value.id, func.attr
            if owner == "yaml" and attr in UNSAFE_YAML:
                found.append(f"{where}: yaml.{attr}")
            if owner in ("pickle", "marshal", "dill", "cloudpickle", "shelve") and attr in ("load", "loads", "open"):
                found.append(f"{where}: {owner}.{attr}")
            if owner == "os" and attr in ("system", "popen") or attr.startswith("spawn") and owner == "os":
                found.append(f"{where}: os.{attr}")
            if owner == "torch" and attr == "load":
                weights_only = [kw for kw in node.keywords if kw.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0].value, ast.Constant)
                        and weights_only[0].value.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
    return found


def test_the_source_check_catches_each_pattern():
    bad = ("import subprocess, yaml, torch, pickle, os\nsubprocess.run('ls', shell=True)\neval('1')\n"
           "yaml.load(s, Loader=yaml.Loader)\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
           "os.system('ls')\n")
    found = unsafe_calls(bad)
    for pattern in ("shell=", "eval", "yaml.load", "Loader", "torch.load without", "pickle.loads", "os.system"):
        assert any(pattern in f for f in found), (pattern, found)
    assert len([f for f in found if "torch.load" in f]) == 2
    assert not unsafe_calls("import yaml, torch\nyaml.safe_load(s)\ntorch.load(p, weights_only=True)\n"
                            "subprocess.run(['ls'], shell=False)\nmodel.eval()\n")


def test_pipeline_source_has_no_unsafe_loading_or_shell():
    files = sorted(PIPELINE.rglob("*.py"))
    assert len(files) > 20
    found = [f for path in files for f in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert not found, found
