"""Experiment tracking at the edge of training: W&B (rank 0 only, in the group :func:`run_group` names)
and DVC metric/plot files.

W&B mode (``tracking.mode``): ``online`` | ``offline`` | ``disabled`` | ``auto``. ``auto`` follows
``WANDB_MODE`` when set, else is online only when an API key is configured (``WANDB_API_KEY`` or a
netrc entry for api.wandb.ai) and offline otherwise. ``wandb.init`` is bounded by
``tracking.init_timeout_s``; an online init that fails (no network) falls back to offline with a
warning, so training never hangs on tracking. Offline runs end with the ``wandb sync`` command.

DVC: ``<out_dir>/metrics.json`` (the DVC metric: a dozen flat headline numbers, see
:func:`train_headline`), ``<out_dir>/details.json`` (the full summary: best / final / last-epoch numbers,
per-class AP; not a DVC metric) and per-epoch plot tables ``<out_dir>/plots/train_loss.csv`` and
``<out_dir>/plots/val_map.csv``.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config, to_dict
from pipeline.data.dataset import resolve_file
from pipeline.data.transforms import read_image
from pipeline.data.validate import DataError
from pipeline.io import atomic_write
from pipeline.logging import get_logger

log = get_logger(__name__)

WANDB_HOST = "api.wandb.ai"


# ---------------------------------------------------------------------------------------- W&B mode
def has_api_key() -> bool:
    """True when W&B credentials are configured (the key itself is never read here)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.is_file():
        return False
    try:
        return netrc.netrc(str(path)).authenticators(WANDB_HOST) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """The concrete W&B mode for ``tracking.mode`` (see module docstring)."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_api_key() else "offline"


# ------------------------------------------------------------------------------------ trackers
class Tracker:
    """No-op tracker: used on ranks other than 0 and when tracking is disabled."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_eval(self, metrics: dict[str, Any], step: int, epoch: int, panel: Sequence[dict] = ()) -> None:
        pass

    def log_model(self, path: Path, metadata: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _never_raises(method):
    """Tracking must never stop training: the first W&B failure (e.g. its service process died) is logged
    once and the tracker becomes a no-op; metrics.json and plots/ do not depend on it."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self.failed:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any W&B problem, network or process
            self.failed = True
            log.warning("W&B %s failed (%s: %s); training continues without W&B tracking (metrics.json and "
                        "plots/ are unaffected)", method.__name__, type(err).__name__, str(err)[:200])
            _quiet_teardown()
            return None
    return guarded


def _quiet_teardown() -> None:
    try:
        import wandb  # wandb is heavy (~1 s): imported only when tracking is on

        wandb.teardown()
    except Exception:  # noqa: BLE001, S110 - best effort: the service is already gone
        pass


class WandbTracker(Tracker):
    """A live W&B run. Keys: ``train/<loss term>``, ``train/lr``, ``val/<metric>``, ``val/per_class_AP``
    (a table), ``val/images`` (a fixed panel with predicted and ground-truth boxes)."""

    def __init__(self, run: Any, mode: str):
        self.run = run
        self.mode = mode
        self.run_id = run.id
        self.failed = False

    @_never_raises
    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    @_never_raises
    def log_eval(self, metrics: dict[str, Any], step: int, epoch: int, panel: Sequence[dict] = ()) -> None:
        import wandb  # wandb is heavy (~1 s): imported only when tracking is on

        data: dict[str, Any] = {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        data["epoch"] = epoch
        per_class = metrics.get("per_class_AP") or {}
        if per_class:
            rows = [[name, None if _nan(ap) else float(ap)] for name, ap in per_class.items()]
            data["val/per_class_AP"] = wandb.Table(columns=["class", "AP"], data=rows)
        if panel:
            data["val/images"] = [_panel_image(item) for item in panel]
        self.run.log(data, step=step)

    @_never_raises
    def log_model(self, path: Path, metadata: dict[str, Any]) -> None:
        import wandb  # wandb is heavy (~1 s): imported only when tracking is on

        art = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=_plain(metadata))
        art.add_file(str(path), name=Path(path).name)
        self.run.log_artifact(art, aliases=["best", "latest"])

    @_never_raises
    def finish(self, exit_code: int = 0) -> None:
        import wandb  # wandb is heavy (~1 s): imported only when tracking is on

        run_dir = Path(self.run.dir).parent
        self.run.finish(exit_code=exit_code)
        # finish() can return before the service has written the run file; shutting the service down
        # flushes it (a later wandb.init starts a new one)
        wandb.teardown()
        if self.mode == "offline":
            log.info("W&B run saved offline; upload it with: wandb sync %s", run_dir)


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _panel_image(item: dict) -> Any:
    """wandb.Image of one validation image with two box groups. ``item``: {"image": HxWx3 RGB uint8,
    "caption", "class_names", "pred": [(x1,y1,x2,y2,score,label)], "gt": [(x1,y1,x2,y2,label)]} in
    original-image pixels."""
    import wandb  # wandb is heavy (~1 s): imported only when tracking is on

    labels = {i: n for i, n in enumerate(item["class_names"])}

    def box(x1, y1, x2, y2, label, caption, score=None):
        out = {"position": {"minX": float(x1), "minY": float(y1), "maxX": float(x2), "maxY": float(y2)},
               "domain": "pixel", "class_id": int(label), "box_caption": caption}
        if score is not None:
            out["scores"] = {"score": float(score)}
        return out

    preds = [box(*b[:4], b[5], f"{labels.get(int(b[5]), b[5])} {b[4]:.2f}", b[4]) for b in item["pred"]]
    gts = [box(*b[:4], b[4], str(labels.get(int(b[4]), b[4]))) for b in item["gt"]]
    return wandb.Image(item["image"], caption=item.get("caption"),
                       boxes={"predictions": {"box_data": preds, "class_labels": labels},
                              "ground_truth": {"box_data": gts, "class_labels": labels}})


def build_panel(detections: Sequence[dict], coco: Any, json_dir: Path, class_names: Sequence[str],
                num_images: int, score_thr: float = 0.3, max_boxes: int = 50) -> list[dict]:
    """The fixed validation panel: the ``num_images`` lowest image ids of the ground truth ``coco``
    (a pycocotools COCO read from a json in ``json_dir``), with their ground-truth boxes and the
    predictions scoring >= ``score_thr``.
    Boxes in original-image pixels; ``category_id`` k+1 is label k (prepared-json convention)."""
    ids = sorted(coco.getImgIds())[:max(num_images, 0)]
    if not ids:
        return []
    cat_ids = sorted(coco.getCatIds())
    label_of = {c: k for k, c in enumerate(cat_ids)}
    wanted = set(ids)
    preds: dict[int, list] = {i: [] for i in ids}
    for d in detections:
        if d["image_id"] in wanted and d["score"] >= score_thr and d["category_id"] in label_of:
            x, y, w, h = d["bbox"]
            preds[d["image_id"]].append((x, y, x + w, y + h, d["score"], label_of[d["category_id"]]))
    panel = []
    for image_id in ids:
        info = coco.imgs[image_id]
        try:
            img = read_image(resolve_file(info["file_name"], Path(json_dir)))
        except DataError:
            img = None
        if img is None:
            log.warning("validation panel: cannot read %s; image left out", info["file_name"])
            continue
        gts = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3],
                label_of[a["category_id"]]) for a in coco.imgToAnns.get(image_id, [])]
        top = sorted(preds[image_id], key=lambda b: -b[4])[:max_boxes]
        panel.append({"image": img[:, :, ::-1].copy(), "caption": f"id {image_id}",
                      "class_names": list(class_names), "pred": top, "gt": gts})
    return panel


def build_tracker(cfg: Config, run_id: str | None = None, rank: int = 0) -> Tracker:
    """A W&B tracker on rank 0 (resuming ``run_id`` when given), a no-op elsewhere or when disabled."""
    if rank != 0:
        return Tracker()
    mode = resolve_mode(cfg.tracking.mode)
    if mode == "disabled":
        return Tracker()
    root = Path(cfg.tracking.dir).resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.environ["WANDB_DIR"] = str(root)
        run = _init(cfg, mode, run_id, root)
    except Exception as err:  # noqa: BLE001 - network down, bad key, no server within init_timeout_s
        if mode != "online":
            log.warning("W&B init failed in %s mode (%s); continuing without tracking", mode, err)
            return Tracker()
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.warning("W&B online init failed (%s); falling back to offline mode "
                    "(sync later with `wandb sync`)", reason)
        mode = "offline"
        try:
            run = _init(cfg, mode, run_id, root)
        except Exception as err2:  # noqa: BLE001 - tracking must never stop training
            log.warning("W&B offline init failed too (%s); continuing without tracking", err2)
            return Tracker()
    return WandbTracker(run, mode)


def run_group(group: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The W&B group of a training run: the same string on every rank and every node of one job.

    ``group`` (``tracking.group``) when set: a sweep passes its name, so all its trials share one group.
    Else, under torchrun, ``torchrun-<TORCHELASTIC_RUN_ID>``: the ``--rdzv-id`` every agent of the job was
    given (``$SLURM_JOB_ID`` in scripts/slurm/train.sbatch; a fresh id per ``--standalone`` launch), which
    also survives ``--max-restarts``. Else None: a single process is a run of its own.
    """
    if group:
        return group
    rid = (os.environ if environ is None else environ).get("TORCHELASTIC_RUN_ID", "")
    return f"torchrun-{rid}" if rid and rid != "none" else None


def _init(cfg: Config, mode: str, run_id: str | None, root: Path) -> Any:
    import wandb  # wandb is heavy (~1 s): imported only when tracking is on

    t = cfg.tracking
    settings = wandb.Settings(init_timeout=float(t.init_timeout_s), console="off", silent=True)
    return wandb.init(project=t.project, entity=t.entity, group=run_group(t.group), name=t.name, dir=str(root),
                      mode=mode, id=run_id, resume="allow" if run_id else None, config=to_dict(cfg),
                      job_type="train", settings=settings, reinit="create_new")


# ------------------------------------------------------------------------------------------ DVC
def append_plot_row(path: Path, row: dict[str, Any], key: str = "epoch") -> None:
    """Append ``row`` to a CSV plot file, first dropping rows whose ``key`` >= this row's (a resumed
    run re-does those epochs). Columns follow the first row written; the file is replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if path.exists():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if float(r.get(key, "nan")) < float(row[key])]
    columns = list(rows[0].keys()) if rows else list(row.keys())
    columns += [c for c in row if c not in columns]

    def write(fh) -> None:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows + [{k: _fmt(v) for k, v in row.items()}]:
            writer.writerow(r)

    atomic_write(path, write)


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


# metrics.json of the train stage: key -> (section of the summary or None for the top level, key there)
TRAIN_HEADLINE = {
    "best_map": (None, "best_map"), "best_epoch": (None, "best_epoch"),
    "best_AP50": ("best", "AP50"), "best_AP75": ("best", "AP75"),
    "best_APs": ("best", "APs"), "best_APm": ("best", "APm"), "best_APl": ("best", "APl"),
    "epochs_completed": (None, "epochs_completed"), "steps": (None, "steps"),
    "nonfinite_skipped": (None, "nonfinite_skipped"),
    "images_per_s": ("train", "images_per_s"), "loss": ("train", "loss"),
}


def train_headline(summary: dict[str, Any]) -> dict[str, float | int | None]:
    """The flat headline numbers of a training summary (None where the run has no such value, e.g. no
    validation yet); the summary itself goes to details.json."""
    out = {}
    for key, (section, name) in TRAIN_HEADLINE.items():
        value = (summary if section is None else summary.get(section) or {}).get(name)
        out[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out


def write_metrics_json(path: Path, data: dict[str, Any]) -> None:
    """A metrics or details JSON file (numbers, nested dicts; NaN/inf as null); replaced atomically."""
    path = Path(path)
    atomic_write(path, json.dumps(_finite(data), indent=2, sort_keys=True, default=_json_default) + "\n")


def _finite(v: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN; DVC would fail to parse it)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return str(v)
