"""Composition of every preset, and the error messages of the schema."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import CONF_DIR, ConfigError, compose, config_hash, diff_keys, from_dict, to_dict

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", PRESETS)
def test_every_experiment_composes(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.model.num_classes >= 1
    assert cfg.data.input_size[0] % 32 == 0 and cfg.data.input_size[1] % 32 == 0


def test_official_presets_match_spec():
    m320 = compose(["experiment=nanodet_plus_m_320"])
    assert m320.model.backbone.size == "1.0x" and m320.model.neck.out_channels == 96
    assert m320.model.aux_head.feat_channels == 192 and list(m320.data.input_size) == [320, 320]
    assert m320.train.lr == 1e-3 and m320.train.weight_decay == 0.05 and m320.train.grad_clip == 35
    assert m320.data.batch_size == 96 and m320.train.epochs == 300
    m15 = compose(["experiment=nanodet_plus_m_1.5x_416"])
    assert m15.model.backbone.size == "1.5x" and m15.model.head.feat_channels == 128
    assert m15.model.aux_head.feat_channels == 256 and list(m15.data.input_size) == [416, 416]


def test_fast_schedule_goes_after_a_data_preset():
    """experiment=[<data preset>,fast]: the preset's model and data, fast's schedule (later options win)."""
    raccoon, fast = compose(["experiment=raccoon"]), compose(["experiment=[raccoon,fast]"])
    assert fast.model == raccoon.model and fast.data == raccoon.data
    assert (fast.train.epochs, fast.train.lr, fast.train.lr_scale_batch, fast.train.warmup_steps,
            fast.train.val_interval) == (12, 0.02, 16, 20, 1)
    assert raccoon.train.epochs == 30  # the preset alone keeps its own schedule
    assert compose(["experiment=[demo,fast]"]).model.num_classes == 5


@pytest.mark.parametrize("model", ["nanodet_plus_m", "nanodet_plus_m_1.5x", "nanodet_plus_m_0.5x"])
def test_every_model_preset_composes(model):
    assert compose([f"model={model}"]).model.head.reg_max == 7


def test_misspelled_key_names_the_right_one():
    with pytest.raises(ConfigError, match=r"train\.epcohs.*Did you mean 'train\.epochs'"):
        compose(["train.epcohs=3"])
    with pytest.raises(ConfigError, match=r"model\.head\.reg_mx.*'model\.head\.reg_max'"):
        compose(["+model.head.reg_mx=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        compose(["train.epochs=many"])


@pytest.mark.parametrize(
    "override, keys",
    [
        ("model.head.strides=[8,16,64]", "model.head.strides"),
        ("model.head.reg_max=0", "model.head.reg_max"),
        ("data.input_size=[200,200]", "data.input_size"),
        ("data.input_size=[0,320]", "data.input_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.neck.out_channels=0", "model.neck.out_channels"),
        ("model.aux_head.feat_channels=100", "model.aux_head.feat_channels"),
        ("data.class_names=[a,b]", "data.class_names / model.num_classes"),
        ("model.backbone.size=2.5x", "model.backbone.size"),
        ("data.source=coco", "data.root"),
    ],
)
def test_cross_field_checks_name_the_keys(override, keys):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert keys in str(err.value)


def test_round_trip_and_hash():
    cfg = compose([])
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    assert config_hash(cfg) == config_hash(again)
    other = to_dict(compose(["model.head.reg_max=10"]))
    assert diff_keys(to_dict(cfg)["model"], other["model"]) == ["head.reg_max: 7 != 10"]


def test_entry_point_rejects_typo_and_prints_config(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    bad = subprocess.run([sys.executable, "-m", "pipeline.prepare", "train.epcohs=3"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2
    assert "Did you mean 'train.epochs'" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--cfg", "job"], cwd=repo,
                        capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "reg_max: 7" in ok.stdout and "hydra" not in ok.stdout.split("\n")[0]


def test_generated_schema_and_params_are_in_sync():
    """conf/schema.yaml and params.yaml are generated from pipeline/config.py and conf/; a stale copy would
    make `dvc repro` train something other than what conf/ says. Fix with `python -m pipeline.config --write`."""
    from pipeline.config import SCHEMA_YAML, params_yaml, schema_yaml

    assert SCHEMA_YAML.read_text() == schema_yaml(), "conf/schema.yaml is stale: python -m pipeline.config --write"
    params = Path(__file__).resolve().parents[2] / "params.yaml"
    assert params.read_text() == params_yaml(), "params.yaml drifted from conf/: python -m pipeline.config --write"
