"""Ray Tune sweeps: sweep-file checks, up-front validation of the space, results and best-experiment files,
and (slow) real sweeps on tiny data: completion, retries of crashing trials, interruption and resume,
multi-worker trials, and Ray bound to 127.0.0.1 only."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tunekit import REPO, TINY, check_ok, read_table, reported_epochs, run_cli, write_sweep

from pipeline.config import CONF_DIR, compose, to_dict
from pipeline.tune import driver as tune_cli
from pipeline.tune.results import (
    TrialRow,
    _status,
    _summary_file,
    leaf_diff,
    trained_config,
    trained_values,
    write_best_experiment,
    write_results,
)
from pipeline.tune.space import (
    SWEEPS_DIR,
    SweepError,
    expand_sample,
    format_value,
    load_sweep,
    sample_overrides,
    validate_space,
)
from pipeline.tune.trial import trial_overrides


# ------------------------------------------------------------------------------------ fast tests
@pytest.mark.parametrize("trial_id", ["90414_00000", "12345", "1e5", "true", "null", "a'b", "x\\y", "end\\"])
def test_trial_overrides_keep_the_trial_id_and_sweep_name_strings(trial_id, tmp_path):
    """A Ray trial id made only of digits and underscores once became the int 9041400000 in tracking.name."""
    sweep = load_sweep("demo_cpu")
    sweep.name = trial_id
    sample = {d.key: d.values[0] for d in sweep.space}
    cfg = compose(trial_overrides({"sweep": sweep, "overrides": ["experiment=demo"]}, sample, tmp_path, trial_id))
    assert cfg.tracking.name == trial_id and cfg.tracking.group == trial_id


def test_shipped_sweeps_load_and_every_combination_composes():
    names = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    assert {"demo_cpu", "reg_max_strides", "head_widths"} <= set(names)
    for name in names:
        sweep = load_sweep(name)
        assert validate_space(sweep, sweep.base_overrides) >= 2


def test_head_widths_keeps_aux_twice_the_neck():
    sweep = load_sweep("head_widths")
    values = expand_sample(sweep, {"model.neck.out_channels": 96, "model.head.stacked_convs": 1})
    assert values["model.head.feat_channels"] == 96 and values["model.aux_head.feat_channels"] == 192
    cfg = compose([*sweep.base_overrides, *sample_overrides(sweep, values)])
    assert (cfg.model.neck.out_channels, cfg.model.head.feat_channels, cfg.model.aux_head.feat_channels) == (96, 96, 192)


@pytest.mark.parametrize("body, expected", [
    ("spaec: {}\n", ["unknown key 'spaec'", "Did you mean 'space'"]),
    ("space: {train.lr: {logunifrom: [0.001, 0.01]}}\n", ["space.train.lr.logunifrom", "loguniform"]),
    ("space: {train.lr: {loguniform: [0.0, 0.01]}}\n", ["space.train.lr.loguniform", "low > 0"]),
    ("space: {train.lr: {uniform: [0.01, 0.001]}}\n", ["space.train.lr.uniform", "low <= high"]),
    ("space: {train.epcohs: {choice: [1, 2]}}\n", ["space.train.epcohs", "Did you mean 'train.epochs'"]),
    ("space: {model.head: {choice: [1]}}\n", ["space.model.head", "section"]),
    ("space: {train.lr: {choice: []}}\n", ["space.train.lr.choice", "non-empty"]),
    ("space: {model.neck.out_channels: {choice: [64]}}\ntied: {model.head.feat_channels: model.neck.kernel_size}\n",
     ["tied.model.head.feat_channels", "source 'model.neck.kernel_size' is not a key of 'space'"]),
    (("space: {model.neck.out_channels: {choice: [64]}}\n"
      "derived: {model.aux_head.feat_channels: \"__import__('os').getcwd()\"}\n"),
     ["derived.model.aux_head.feat_channels", "nothing else is evaluated"]),
    ("space: {train.lr: {choice: [0.001]}}\nscheduler: {type: asha, grace: 1}\n",
     ["unknown key 'scheduler.grace'", "grace_period"]),
    ("space: {train.lr: {choice: [0.001]}}\nnum_samples: 0\n", ["'num_samples'", ">= 1"]),
    ("space: {train.lr: {choice: [0.001]}}\nname: 'a b'\n", ["'name'", "letters"]),
])
def test_bad_sweep_files_name_file_and_key(tmp_path, body, expected):
    path = write_sweep(tmp_path, body)
    with pytest.raises(SweepError) as err:
        load_sweep(str(path))
    assert str(path) in str(err.value)
    for part in expected:
        assert part in str(err.value)


def test_unknown_sweep_name_lists_shipped_ones():
    with pytest.raises(SweepError, match="demo_cpu"):
        load_sweep("no_such_sweep")


def test_invalid_combinations_are_named(tmp_path):
    # 96 channels with 64 GroupNorm groups fails only together: each value alone is fine with the base.
    path = write_sweep(tmp_path, """
        base_overrides: [experiment=demo]
        space:
          model.aux_head.feat_channels: {choice: [96, 128]}
          model.aux_head.num_groups: {choice: [32, 64]}
          data.input_size: {choice: [[64, 64], [70, 70]]}
    """)
    sweep = load_sweep(str(path))
    with pytest.raises(SweepError) as err:
        validate_space(sweep, sweep.base_overrides)
    msg = str(err.value)
    assert str(path) in msg and "nothing was run" in msg
    assert "space.data.input_size=[70,70] fails on its own" in msg
    assert "model.aux_head.feat_channels=96, model.aux_head.num_groups=64" in msg and "GroupNorm" in msg


def test_continuous_bounds_are_checked(tmp_path):
    path = write_sweep(tmp_path, """
        base_overrides: [experiment=demo]
        space:
          train.lr: {loguniform: [1.0e-5, 1.0e-3]}
    """)
    sweep = load_sweep(str(path))
    with pytest.raises(SweepError, match=r"train.lr=1e-05 fails on its own.*min_lr"):
        validate_space(sweep, sweep.base_overrides)
    with pytest.raises(SweepError, match=r"'train.lr' is set by 'space' and also by the override 'train.lr=0.01'"):
        validate_space(sweep, [*sweep.base_overrides, "train.lr=0.01"])


def test_invalid_space_is_rejected_before_ray_starts(tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path, """
        base_overrides: [experiment=demo]
        space:
          model.neck.out_channels: {choice: [64, 80]}
        derived:
          model.aux_head.feat_channels: "model.neck.out_channels"
    """)

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started for an invalid search space")

    monkeypatch.setattr(tune_cli, "init_ray", no_ray)
    code = tune_cli.main([f"sweep={path}", f"out={tmp_path / 'out'}", f"experiment_dir={tmp_path / 'exp'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err and "space.model.neck.out_channels=80" in err and "GroupNorm" in err
    assert not (tmp_path / "out").exists()


def test_cli_splits_options_from_overrides(tmp_path):
    args = tune_cli.parse_args(["sweep=demo_cpu", "train.epochs=2", f"out={tmp_path}", "resume=false"])
    assert args.sweep == "demo_cpu" and args.overrides == ("train.epochs=2",)
    assert args.out == tmp_path.resolve() and args.resume == "false"
    with pytest.raises(SweepError, match="missing sweep="):
        tune_cli.parse_args(["train.epochs=2"])
    with pytest.raises(SweepError, match="resume='maybe'"):
        tune_cli.parse_args(["sweep=x", "resume=maybe"])
    with pytest.raises(SweepError, match="not key=value"):
        tune_cli.parse_args(["sweep=x", "oops"])
    with pytest.raises(SweepError, match="107 bytes"):
        tune_cli.parse_args(["sweep=x", f"ray_tmp={tmp_path / ('a' * 40)}"])


def test_cli_reports_errors_with_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "pipeline.tune", "sweep=no_such_sweep"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no_such_sweep" in proc.stderr and "Traceback" not in proc.stderr


def conf_copy(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    return conf


def test_best_experiment_file_rebuilds_the_best_config(tmp_path):
    conf = conf_copy(tmp_path)
    overrides = ["experiment=demo", "model=nanodet_plus_m", "model.head.reg_max=10", "train.lr=0.0012345",
                 "model.head.strides=[8,16,32]", "tracking.mode=disabled", "train.out_dir=/elsewhere"]
    best = compose(overrides)
    path = write_best_experiment(conf / "experiment" / "best_t.yaml", best, "demo",
                                 lambda o: compose(o, config_dir=conf), ["a comment"])
    text = path.read_text()
    assert text.startswith("# @package _global_\n# a comment\n")
    assert yaml.safe_load(text)["defaults"] == ["demo", "_self_"]
    again = to_dict(compose(["experiment=best_t"], config_dir=conf))
    differ = leaf_diff(to_dict(best), again)
    assert differ == {}, differ
    assert again["model"]["backbone"]["size"] == "1.0x" and again["train"]["lr"] == 0.0012345
    assert again["train"]["out_dir"] != "/elsewhere" and again["tracking"]["mode"] != "disabled"
    # a sweep around a previous best: the new file must not include itself
    rerun = compose(["experiment=best_t", "train.lr=0.002"], config_dir=conf)
    write_best_experiment(path, rerun, "best_t", lambda o: compose(o, config_dir=conf), [])
    assert yaml.safe_load(path.read_text())["defaults"] == ["_self_"]
    assert leaf_diff(to_dict(rerun), to_dict(compose(["experiment=best_t"], config_dir=conf))) == {}


def test_results_are_sorted_best_first(tmp_path):
    rows = [TrialRow("a", "finished", {"train.lr": 0.001}, {"mAP": 0.1, "AP50": 0.2}, best_epoch=1, epochs=2),
            TrialRow("b", "error", {"train.lr": 0.002}, error="RuntimeError: boom | x"),
            TrialRow("c", "finished", {"train.lr": 0.003}, {"mAP": 0.3, "AP50": 0.5}, best_epoch=0, epochs=2,
                     params=1000, flops=2_000_000, latency_ms=1.5)]
    ordered = write_results(tmp_path, rows, "mAP", "max", ["# title"])
    assert [r.trial_id for r in ordered] == ["c", "a", "b"]
    with open(tmp_path / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial_id"] for r in table] == ["c", "a", "b"]
    assert table[0]["gflops"] == "0.002" and table[0]["train.lr"] == "0.003" and table[2]["mAP"] == ""
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# title") and "RuntimeError: boom \\| x" in md
    assert [r.trial_id for r in write_results(tmp_path, rows, "mAP", "min", [])] == ["a", "c", "b"]


def test_results_name_the_node_of_every_attempt(tmp_path):
    """results.csv: node ip and id of the last attempt, and every attempt's node in order; results.md: the
    ip and a short id (the per-attempt list only in the csv)."""
    a, b = "a" * 56, "b" * 56
    rows = [TrialRow("t1", "finished", {}, {"mAP": 0.2}, failures=1, restarts=1,
                     nodes=[{"node_id": b, "node_ip": "127.0.0.1"}, {"node_id": a, "node_ip": "127.0.0.1"}]),
            TrialRow("t2", "error", {})]
    write_results(tmp_path, rows, "mAP", "max", [])
    table = read_table(tmp_path)
    assert (table["t1"]["node_ip"], table["t1"]["node_id"], table["t1"]["attempt_nodes"]) == ("127.0.0.1", a, f"{b} {a}")
    assert table["t2"]["node_id"] == table["t2"]["attempt_nodes"] == ""
    md = (tmp_path / "results.md").read_text()
    assert f"| 127.0.0.1 | {a[:8]} |" in md and b not in md and "attempt_nodes" not in md


@pytest.mark.parametrize("address, expected", [
    (None, True), ("127.0.0.1:6379", True), ("localhost:6379", True), ("ray://127.0.0.1:10001", True),
    ("auto", False), ("10.0.0.5:6379", False), ("ray://head.example:10001", False)])
def test_loopback_cluster_addresses_keep_the_driver_on_loopback(address, expected):
    assert tune_cli.loopback(address) is expected


def test_rows_report_what_the_trial_checkpoint_trained(tmp_path):
    """A row's values come from the config in the trial's own checkpoint (best.pt, else last.pt, else the
    config.yaml training wrote), and a value that differs from Tune's sample is named."""
    sweep = load_sweep("demo_cpu")  # samples model.head.reg_max and train.lr
    sampled = expand_sample(sweep, {"model.head.reg_max": 5, "train.lr": 0.01})
    train = tmp_path / "train"
    assert trained_config(train) == (None, None)  # never started: the row keeps the sample
    assert trained_values(sampled, None) == (sampled, [])

    def trained(reg_max: int) -> dict:
        return to_dict(compose(["experiment=demo", f"model.head.reg_max={reg_max}", "train.lr=0.01"]))

    train.mkdir()
    (train / "config.yaml").write_text(yaml.safe_dump(trained(5)))
    assert trained_config(train) == (trained(5), train / "config.yaml")
    torch.save({"config": trained(7), "model": {}}, train / "last.pt")
    assert trained_config(train) == (trained(7), train / "last.pt")
    torch.save({"config": trained(10), "model": {}}, train / "best.pt")
    config, source = trained_config(train)
    assert source == train / "best.pt" and config["model"]["head"]["reg_max"] == 10
    values, differ = trained_values(sampled, config)
    assert values == {"model.head.reg_max": 10, "train.lr": 0.01}
    assert differ == ["model.head.reg_max=10 (sampled 5)"]
    assert trained_values(sampled, trained(5)) == (sampled, [])


def test_status_reads_trainings_own_stop_from_details_json(tmp_path):
    """metrics.json holds only headline numbers; why training stopped is in details.json beside it (a
    trial folder from before details.json has it in metrics.json)."""
    train = tmp_path / "train"
    train.mkdir()
    (train / "metrics.json").write_text(json.dumps({"epochs_completed": 2, "best_map": 0.1}))
    assert _status("TERMINATED", None, 2, 5, _summary_file(train)) == "stopped by ASHA"
    (train / "details.json").write_text(json.dumps({"stopped": "early_stop", "epochs_completed": 2}))
    assert _status("TERMINATED", None, 2, 5, _summary_file(train)) == "finished (early_stop)"
    (train / "details.json").unlink()
    (train / "metrics.json").write_text(json.dumps({"stopped": "max_steps", "epochs_completed": 2}))
    assert _status("TERMINATED", None, 2, 5, _summary_file(train)) == "finished (max_steps)"
    assert _status("TERMINATED", None, 5, 5, _summary_file(train)) == "finished"


# ------------------------------------------------------------------------------------ slow tests
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tune_data") / "prepared"  # generated once by the first sweep


def read_md_table(out: Path) -> dict[str, dict]:
    """results.md's table as {trial_id: {column: cell}} (cells as printed, '\\|' unescaped)."""
    lines = [ln for ln in (out / "results.md").read_text().splitlines() if ln.startswith("| ")]
    split = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])] for ln in lines]
    header, body = split[0], split[1:]
    return {cells[header.index("trial_id")]: dict(zip(header, cells)) for cells in body}


def structure_of(state: dict) -> dict:
    """What a NanoDet-Plus training state dict says about the model, from tensor shapes alone."""
    levels = sorted(int(k.split(".")[2]) for k in state
                    if k.startswith("head.gfl_cls.") and k.endswith(".weight"))
    assert levels == list(range(len(levels))), levels
    outs = [state[f"head.gfl_cls.{i}.weight"] for i in levels]  # 1x1 output conv per level: [C + 4(R+1), feat]
    num_classes = state["aux_head.gfl_cls.weight"].shape[0]
    assert len({tuple(w.shape) for w in outs}) == 1, [tuple(w.shape) for w in outs]
    bins, rest = divmod(outs[0].shape[0] - num_classes, 4)
    assert rest == 0, f"head output channels {outs[0].shape[0]} != {num_classes} + 4 * (reg_max + 1)"
    extra = {int(k.split(".")[2]) for k in state if k.startswith("fpn.extra_lvl_out_conv.")}
    neck = state["fpn.reduce_layers.0.conv.weight"].shape[0]
    return {
        "num_classes": num_classes, "out_channels": outs[0].shape[0], "reg_max": bins - 1,
        "reg_max_aux": state["aux_head.gfl_reg.weight"].shape[0] // 4 - 1,
        "reg_max_integral": state["head.distribution_project.project"].numel() - 1,
        "levels": len(levels), "neck_levels": 3 + len(extra),
        "aux_levels": len({k for k in state if k.startswith("aux_head.scales.")}),
        "neck_width": neck, "head_in": state["head.cls_convs.0.0.depthwise.weight"].shape[0],
        "head_width": outs[0].shape[1],
        "head_tower_width": state["head.cls_convs.0.0.pointwise.weight"].shape[0],
        "aux_width": state["aux_head.gfl_cls.weight"].shape[1],
        "aux_in": state["aux_head.cls_convs.0.conv.weight"].shape[1],
    }


def inference_params(state: dict) -> int:
    """Parameters of backbone, neck and head (the table's 'params': the inference graph, buffers excluded)."""
    buffers = (".running_mean", ".running_var", ".num_batches_tracked", "distribution_project.project")
    return sum(v.numel() for k, v in state.items()
               if k.startswith(("backbone.", "fpn.", "head.")) and not k.endswith(buffers))


@pytest.mark.slow
def test_grid_sweep_trains_the_sampled_models_and_the_table_reports_them(tmp_path, data_dir):
    """2 x 2 grid over reg_max and strides (a list value cannot be tied or derived, so two trials cannot vary
    both), with neck/head/aux widths derived from reg_max: each trial's own checkpoint must hold the sampled
    model, and results.csv/.md must report, for that trial, what its checkpoint shows."""
    conf = conf_copy(tmp_path)
    sweep = write_sweep(tmp_path, """
        name: tiny
        num_samples: 1
        max_concurrent: 2
        scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
        base_overrides: [experiment=demo, train.epochs=1]
        space:
          model.head.reg_max: {grid: [4, 8]}
          model.head.strides: {grid: [[8, 16, 32], [8, 16, 32, 64]]}
          train.lr: {loguniform: [1.0e-3, 3.0e-3]}
        derived:
          model.neck.out_channels: "8 * model.head.reg_max"
          model.head.feat_channels: "6 * model.head.reg_max"
          model.aux_head.feat_channels: "16 * model.head.reg_max"
    """)
    tiny = [o for o in TINY if not o.startswith("model.head.strides=")]  # the sweep samples the strides
    out = tmp_path / "out"
    proc = run_cli([f"sweep={sweep}", f"out={out}", f"experiment_dir={conf / 'experiment'}",
                    f"data.prepared_dir={data_dir}", *tiny])
    check_ok(proc)
    table, md = read_table(out), read_md_table(out)
    trial_dirs = sorted((out / "ray").glob("trial_*"))
    assert len(table) == 4 and set(md) == set(table) == {d.name.removeprefix("trial_") for d in trial_dirs}
    trained = set()
    for trial in trial_dirs:  # found on disk, not through the table
        trial_id = trial.name.removeprefix("trial_")
        row, md_row = table[trial_id], md[trial_id]
        best = torch.load(trial / "train" / "best.pt", map_location="cpu", weights_only=True)
        last = torch.load(trial / "train" / "last.pt", map_location="cpu", weights_only=True)
        got = structure_of(best["model"])
        assert structure_of(best["ema"]) == got == structure_of(last["model"]), trial_id
        assert got["out_channels"] == 5 + 4 * (got["reg_max"] + 1) and got["num_classes"] == 5
        assert got["reg_max"] == got["reg_max_aux"] == got["reg_max_integral"], got
        assert got["levels"] == got["neck_levels"] == got["aux_levels"], got
        assert got["head_in"] == got["neck_width"] and got["aux_in"] == 2 * got["neck_width"], got
        assert got["head_tower_width"] == got["head_width"], got
        strides = [8 * 2**i for i in range(got["levels"])]  # the only strides a model with these levels can have
        shown = {"model.head.reg_max": str(got["reg_max"]), "model.head.strides": format_value(strides),
                 "model.neck.out_channels": str(got["neck_width"]),
                 "model.head.feat_channels": str(got["head_width"]),
                 "model.aux_head.feat_channels": str(got["aux_width"])}
        # 1. the table reports, for this trial, the model its checkpoint holds, and this trial's own metric
        assert {k: row[k] for k in shown} == shown, f"results.csv row {trial_id} vs its checkpoint"
        assert {k: md_row[k] for k in shown} == shown, f"results.md row {trial_id} vs its checkpoint"
        assert float(row["mAP"]) == best["best_map"] and md_row["mAP"] == f"{best['best_map']:.4f}", trial_id
        assert row["best_epoch"] == md_row["best_epoch"] == str(best["epoch"]) == "0"
        assert int(row["params"]) == inference_params(best["model"]) == int(md_row["params"]), trial_id
        # 2. the checkpoint's config says the same as its tensors
        for ckpt in (best, last):
            model = ckpt["config"]["model"]
            assert (model["head"]["reg_max"], model["head"]["strides"], model["neck"]["out_channels"],
                    model["head"]["feat_channels"], model["aux_head"]["feat_channels"]) == (
                got["reg_max"], strides, got["neck_width"], got["head_width"], got["aux_width"]), trial_id
            assert ckpt["config"]["train"]["lr"] == float(row["train.lr"])
        # 3. ... and it is what Tune sampled for this trial (Ray's own record), widths derived from reg_max
        sampled = json.loads((trial / "params.json").read_text())
        r = sampled["model.head.reg_max"]
        assert (got["reg_max"], strides, got["neck_width"], got["head_width"], got["aux_width"]) == (
            r, sampled["model.head.strides"], 8 * r, 6 * r, 16 * r), f"trial {trial_id}: sampled {sampled}, trained {got}"
        trained.add((got["reg_max"], got["levels"]))
        assert row["error"] == "" and row["status"] == "finished", row
        # the rest of the trial's folder
        assert row["epochs"] == "1" and row["failures"] == "0"
        assert float(row["gflops"]) > 0 and float(row["cpu_latency_ms"]) > 0
        assert list(trial.glob("checkpoint_*/last.pt"))
        config_yaml = yaml.safe_load((trial / "train" / "config.yaml").read_text())
        assert config_yaml["tracking"]["group"] == "tiny" and config_yaml["tracking"]["name"] == trial_id
        assert config_yaml["train"]["val_interval"] == 1 and config_yaml["train"]["out_dir"] == str(trial / "train")
    assert trained == {(4, 3), (4, 4), (8, 3), (8, 4)}  # every grid point trained once
    assert "| rank | trial_id | status | mAP |" in (out / "results.md").read_text()
    best_row = next(r for r in table.values() if r["rank"] == "1")
    best_file = conf / "experiment" / "best_tiny.yaml"
    assert best_file.read_text().startswith("# @package _global_")
    rebuilt = to_dict(compose(["experiment=best_tiny"], config_dir=conf))
    keys = ["model.head.reg_max", "model.head.strides", "train.lr", "model.neck.out_channels",
            "model.head.feat_channels", "model.aux_head.feat_channels"]
    expected = to_dict(compose(["experiment=demo", "train.epochs=1", f"data.prepared_dir={data_dir}", *tiny,
                                *(f"{k}={best_row[k]}" for k in keys)]))
    assert leaf_diff(expected, rebuilt) == {}
    assert not (REPO / "conf" / "experiment" / "best_tiny.yaml").exists()


@pytest.mark.slow
def test_crashing_trial_is_retried_from_its_checkpoint_and_reported(tmp_path, data_dir):
    sweep = write_sweep(tmp_path, """
        name: crash
        num_samples: 1
        scheduler: {type: fifo}
        max_failures: 1
        base_overrides: [experiment=demo, train.epochs=3]
        space:
          model.head.reg_max: {grid: [7]}
    """)
    out = tmp_path / "out"
    proc = run_cli([f"sweep={sweep}", f"out={out}", f"experiment_dir={tmp_path / 'exp'}",
                    f"data.prepared_dir={data_dir}", *TINY], inject="always")
    check_ok(proc, 1)  # every trial failed: no best experiment
    assert "no trial ran to its end" in proc.stderr
    (row,) = read_table(out).values()
    assert row["status"] == "error" and "InjectedFailure" in row["error"]
    assert row["failures"] == "2" and row["restarts"] == "1"
    assert reported_epochs(row) == [1, 2]  # the retry went on from epoch 1's checkpoint, not from scratch
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_retries(tmp_path, data_dir):
    sweep = write_sweep(tmp_path, """
        name: resume
        num_samples: 1
        max_concurrent: 1
        scheduler: {type: fifo}
        max_failures: 1
        base_overrides: [experiment=demo, train.epochs=2]
        space:
          model.head.reg_max: {grid: [5, 7]}
    """)
    out, exp = tmp_path / "out", tmp_path / "exp"
    args = [f"sweep={sweep}", f"out={out}", f"experiment_dir={exp}", f"data.prepared_dir={data_dir}", *TINY]
    first = run_cli(args, inject="interrupt")  # Ctrl-C reaches the driver after the first validation
    check_ok(first, 130)
    assert "INTERRUPTED" in (out / "results.md").read_text() and not exp.exists()
    changed = run_cli([*args, "train.lr=0.003"])
    check_ok(changed, 2)
    assert "different search space or overrides" in changed.stderr
    second = run_cli(args, inject="once")  # the trial not started before fails once and is retried
    check_ok(second)
    assert "continuing sweep resume" in second.stderr + second.stdout
    table = read_table(out)
    assert len(table) == 2 and all(r["status"] == "finished" for r in table.values())
    by_reg = {r["model.head.reg_max"]: r for r in table.values()}
    assert by_reg["5"]["restarts"] == "1" and by_reg["5"]["failures"] == "0"
    assert by_reg["7"]["restarts"] == "1" and by_reg["7"]["failures"] == "1"
    for row in table.values():
        assert reported_epochs(row) == [1, 2]  # resumed from the reported checkpoint: no gap, no repeat
    assert (exp / "best_resume.yaml").is_file()


@pytest.mark.slow
def test_multi_worker_trial_runs_ddp_through_ray_train(tmp_path, data_dir):
    sweep = write_sweep(tmp_path, """
        name: ddp
        num_samples: 1
        resources: {cpu: 0.5, gpu: 0}
        workers_per_trial: 2
        scheduler: {type: fifo}
        base_overrides: [experiment=demo, train.epochs=2]
        space:
          model.head.reg_max: {grid: [7]}
    """)
    out = tmp_path / "out"
    # 600 s: on a 2-core machine under other load (load average 8-14) the 300 s of the others ran out twice
    # after the first epoch's report (Ray Train starts its controller and 2 workers, each importing torch)
    proc = run_cli([f"sweep={sweep}", f"out={out}", f"experiment_dir={tmp_path / 'exp'}",
                    f"data.prepared_dir={data_dir}", *TINY], timeout=600)
    check_ok(proc)
    (row,) = read_table(out).values()
    assert row["status"] == "finished" and reported_epochs(row) == [1, 2]
    summary = json.loads((Path(row["trial_dir"]) / "train" / "metrics.json").read_text())
    assert summary["steps"] == 4  # 16 images / (batch 4 x 2 ranks) = 2 steps per epoch: two ranks trained


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only():
    pytest.importorskip("psutil")
    ray_tmp = tempfile.mkdtemp(prefix="rt-")  # Ray's socket paths must stay under 107 bytes
    script = textwrap.dedent(f"""
        import ipaddress, psutil
        from pathlib import Path
        from pipeline.tune import driver as tune
        tune.init_ray(tune.Args(sweep="x"), Path({ray_tmp!r}))
        import ray
        ray.get(ray.remote(lambda: 1).remote())
        pids = {{psutil.Process().pid}} | {{p.pid for p in psutil.Process().children(recursive=True)}}
        found = [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
        ray.shutdown()
        print(found)
        bad = [a for a in found if not ipaddress.ip_address(a[0].removeprefix("::ffff:")).is_loopback]
        assert found and not bad, bad
    """)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
