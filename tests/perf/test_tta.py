"""``python -m pipeline.bench tta``: both sides get the same data and recipe, the curves come back as
(epoch, wall seconds, mAP), and the summary compares them. The official side runs the real
../shared/anchors scripts (nd_make_config.py, nd_parse_log.py) around a stand-in ``tools/train.py`` that
records the config it was given and logs in NanoDet's format: the real nanodet is not installed in CI."""
from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from sharedkit import SHARED, Folder, require_folder
from testkit import PYTHON, REPO, TINY_MODEL, subprocess_env

from pipeline.tools.tta import official_coco_layout, summarize, time_to

ANCHORS = Folder(SHARED / "anchors", "nd_make_config.py", "NANODET_ANCHORS_DIR",
                 "scripts that run the official NanoDet-Plus beside ours")

TINY = [*TINY_MODEL, "data.input_size=[64,64]", "data.builtin.num_train=8", "data.builtin.num_val=4",
        "data.builtin.image_size=[64,64]", "data.builtin.max_objects=2", "data.batch_size=4", "data.eval_batch_size=4",
        "data.num_workers=0", "train.epochs=2", "train.warmup_steps=2", "train.lr=0.01", "train.device=cpu"]

# the keys of config/nanodet-plus-m_320.yml that nd_make_config.py and pipeline.tools.tta read or write
OFFICIAL_YML = {
    "save_dir": "workspace/x",
    "model": {"weight_averager": {"name": "ExpMovingAverager", "decay": 0.9998},
              "arch": {"name": "NanoDetPlus", "detach_epoch": 10,
                       "backbone": {"name": "ShuffleNetV2", "model_size": "1.0x", "out_stages": [2, 3, 4]},
                       "fpn": {"name": "GhostPAN", "in_channels": [116, 232, 464], "out_channels": 96,
                               "kernel_size": 5, "num_extra_level": 1},
                       "head": {"name": "NanoDetPlusHead", "num_classes": 80, "input_channel": 96,
                                "feat_channels": 96, "stacked_convs": 2, "kernel_size": 5,
                                "strides": [8, 16, 32, 64], "reg_max": 7},
                       "aux_head": {"name": "SimpleConvHead", "num_classes": 80, "input_channel": 192,
                                    "feat_channels": 192, "stacked_convs": 4, "strides": [8, 16, 32, 64],
                                    "reg_max": 7}}},
    "data": {"train": {"img_path": "a", "ann_path": "b", "input_size": [320, 320], "keep_ratio": False,
                       "pipeline": {"scale": [0.6, 1.4], "stretch": [[0.8, 1.2], [0.8, 1.2]], "translate": 0.2,
                                    "flip": 0.5, "brightness": 0.2, "contrast": [0.6, 1.4],
                                    "saturation": [0.5, 1.2]}},
             "val": {"img_path": "c", "ann_path": "d", "input_size": [320, 320], "keep_ratio": False}},
    "device": {"gpu_ids": [0], "workers_per_gpu": 10, "batchsize_per_gpu": 96},
    "schedule": {"optimizer": {"name": "AdamW", "lr": 0.001, "weight_decay": 0.05},
                 "warmup": {"name": "linear", "steps": 500, "ratio": 0.0001}, "total_epochs": 300,
                 "lr_schedule": {"name": "CosineAnnealingLR", "T_max": 300, "eta_min": 0.00005},
                 "val_intervals": 10},
    "grad_clip": 35, "log": {"interval": 50}, "class_names": ["x"],
}

# logs like the official trainer: a Train and a Val line per epoch, then the metrics dict
FAKE_TRAIN = textwrap.dedent('''
    import datetime, json, sys, time, yaml
    import nanodet  # as the real tools/train.py: found only with the checkout on the path
    cfg_path, seed = sys.argv[1], int(sys.argv[sys.argv.index("--seed") + 1])
    cfg = yaml.safe_load(open(cfg_path))
    json.dump({"cfg": cfg, "seed": seed}, open(cfg_path + ".seen.json", "w"))
    epochs = cfg["schedule"]["total_epochs"]
    def line(msg):
        stamp = datetime.datetime.now().strftime("%m-%d %H:%M:%S")
        print(f"[NanoDet][{stamp}]INFO:{msg}", flush=True)
    for e in range(1, epochs + 1):
        line(f"Train|Epoch{e}/{epochs}|Iter{e}(1/1)| mem:0G| lr:1.00e-03| loss_qfl:1.0|")
        time.sleep(1.1)
        line(f"Val|Epoch{e}/{epochs}|Iter{e}(1/1)| mem:0G| lr:1.00e-03| loss_qfl:1.0|")
        m = round(0.1 * e + 0.01 * seed, 4)
        line("Val_metrics: " + repr({"mAP": m, "AP_50": 2 * m, "AP_75": m}))
''')


@pytest.fixture(scope="module")
def fake_nanodet(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("nanodet_src")
    (src / "nanodet").mkdir()
    (src / "nanodet" / "__init__.py").write_text("")
    (src / "config").mkdir()
    (src / "config" / "nanodet-plus-m_320.yml").write_text(yaml.safe_dump(OFFICIAL_YML))
    (src / "tools").mkdir()
    (src / "tools" / "train.py").write_text(FAKE_TRAIN)
    return src


def _tta(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = subprocess_env(PYTHONPATH=str(REPO))  # no empty entry: that would put the working folder on the path
    return subprocess.run([PYTHON, "-m", "pipeline.bench", "tta", "--set", *TINY, "--out-dir", str(out), *args],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tta_runs_both_sides_on_the_same_data_and_recipe(tmp_path, fake_nanodet):
    """~40 s: two short trainings of ours and the stand-in official run, one seed each side."""
    anchors = require_folder(ANCHORS)
    out = tmp_path / "tta"
    proc = _tta(out, "--seeds", "3", "--official", "--official-python", PYTHON, "--nanodet-src", str(fake_nanodet),
                "--anchors", str(anchors))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "tta.json").read_text())
    assert json.loads(proc.stdout) == report
    ours, official = report["runs"]
    assert (ours["side"], official["side"], ours["seed"], official["seed"]) == ("ours", "official", 3, 3)

    # ours: one row per epoch (1-based like the official log), wall time rising, the mAPs of the run's CSV
    assert [r["epoch"] for r in ours["rows"]] == [1, 2]
    assert 0 < ours["rows"][0]["elapsed_s"] < ours["rows"][1]["elapsed_s"] <= ours["wall_s"]
    csv_lines = (out / "ours_seed3" / "plots" / "val_map.csv").read_text().splitlines()[1:]
    assert [round(float(line.split(",")[2]), 4) for line in csv_lines] == [r["mAP"] for r in ours["rows"]]

    # the official side: the recipe and model it was given, and its curve as logged
    seen = json.loads((out / "official_seed3" / "official.yml.seen.json").read_text())
    cfg, arch = seen["cfg"], seen["cfg"]["model"]["arch"]
    assert seen["seed"] == 3
    assert arch["backbone"]["model_size"] == "0.5x" and arch["fpn"]["in_channels"] == [48, 96, 192]
    assert arch["fpn"]["out_channels"] == 32 and arch["fpn"]["num_extra_level"] == 0
    assert arch["head"]["feat_channels"] == 32 and arch["head"]["strides"] == [8, 16, 32]
    assert arch["aux_head"]["input_channel"] == 64 and arch["aux_head"]["feat_channels"] == 64
    assert arch["head"]["num_classes"] == 3 and cfg["class_names"] == ["circle", "triangle", "square"]
    assert cfg["data"]["train"]["input_size"] == [64, 64] and cfg["device"]["batchsize_per_gpu"] == 4
    assert cfg["schedule"]["total_epochs"] == 2 and cfg["schedule"]["val_intervals"] == 1
    assert cfg["schedule"]["optimizer"]["lr"] == 0.01 and cfg["schedule"]["warmup"]["steps"] == 2
    data_root = out / "official_data"
    assert cfg["data"]["train"]["ann_path"] == str(data_root / "instances_train.json")
    assert [r["mAP"] for r in official["rows"]] == [0.13, 0.23]  # 0.1 * epoch + 0.01 * seed
    assert official["rows"][0]["elapsed_s"] < official["rows"][1]["elapsed_s"]

    summary = report["summary"]
    assert summary["official"]["final_mAP"] == [0.23] and summary["target_mAP"] == 0.23
    assert summary["final_mAP_gap"] == pytest.approx(ours["rows"][-1]["mAP"] - 0.23, abs=1e-4)
    assert (out / "tta.png").stat().st_size > 1000

    # the same command again reuses the finished runs (a long comparison survives one side failing)
    seen_file = out / "official_seed3" / "official.yml.seen.json"
    before = seen_file.stat().st_mtime_ns
    again = _tta(out, "--seeds", "3", "--official", "--official-python", PYTHON, "--nanodet-src", str(fake_nanodet),
                 "--anchors", str(anchors))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["runs"] == report["runs"] and seen_file.stat().st_mtime_ns == before


def test_official_layout_links_the_same_images_and_keeps_the_boxes(tmp_path):
    prepared = tmp_path / "prepared"
    (prepared / "images").mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "a.jpg"
    outside.parent.mkdir()
    for path in (prepared / "images" / "a.jpg", outside):
        path.write_bytes(b"jpeg")
    coco = {"images": [{"id": 1, "file_name": "images/a.jpg", "width": 4, "height": 4},
                       {"id": 2, "file_name": str(outside), "width": 4, "height": 4}],  # same base name
            "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "x"}]}
    for split in ("train", "val"):
        (prepared / f"{split}.json").write_text(json.dumps(coco))
    root = official_coco_layout(prepared, tmp_path / "official")
    written = json.loads((root / "instances_train.json").read_text())
    assert written["annotations"] == coco["annotations"] and written["categories"] == coco["categories"]
    names = [im["file_name"] for im in written["images"]]
    assert len(set(names)) == 2  # two images with the same base name stay two files
    assert (root / "train" / names[0]).resolve() == (prepared / "images" / "a.jpg").resolve()
    assert (root / "train" / names[1]).resolve() == outside.resolve()


def test_summary_time_to_the_official_final_map():
    rows = [{"epoch": 1, "elapsed_s": 10.0, "mAP": 0.1}, {"epoch": 2, "elapsed_s": 20.0, "mAP": 0.3},
            {"epoch": 3, "elapsed_s": 30.0, "mAP": 0.25}]
    assert time_to(rows, 0.3) == 20.0 and time_to(rows, 0.31) is None
    runs = [{"side": "ours", "seed": 0, "wall_s": 30.0, "rows": rows},
            {"side": "official", "seed": 0, "wall_s": 100.0, "rows": [{"epoch": 3, "elapsed_s": 100.0, "mAP": 0.2}]},
            {"side": "official", "seed": 1, "wall_s": 80.0, "rows": [{"epoch": 3, "elapsed_s": 80.0, "mAP": 0.3}]}]
    s = summarize(runs)
    assert s["target_mAP"] == 0.25  # the official mean final mAP
    assert s["official"]["final_mAP_spread"] == pytest.approx(0.1)
    assert s["ours_time_to_target_s"] == [20.0]
    assert s["ours_time_to_target_vs_official_wall"] == [round(20.0 / 90.0, 3)]
    assert s["final_mAP_gap"] == 0.0  # ours ends at 0.25


def test_missing_official_reference_is_one_line(tmp_path):
    proc = _tta(tmp_path / "x", "--official", "--official-python", str(tmp_path / "nope" / "python"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        (f"error: --official-python: {tmp_path / 'nope' / 'python'} does not exist; set up the official reference "
         "as in ../shared/anchors/README.md or leave out --official")]
