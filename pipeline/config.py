"""Typed configuration: the schema, one compose/load function, and the cross-field checks.

Every entry point, every torchrun rank and every Ray trial calls :func:`compose` (or
:func:`validate` on a Hydra-composed DictConfig), so all of them see the identical resolved config.
Dataclass defaults equal the official NanoDet-Plus-m 320 recipe (spec section 1); the presets in
``conf/`` only state what differs from it.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from pipeline.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

BACKBONE_CHANNELS = {  # ShuffleNetV2 stage output channels (stem, stage2, stage3, stage4), spec section 3
    "0.5x": (24, 48, 96, 192),
    "1.0x": (24, 116, 232, 464),
    "1.5x": (24, 176, 352, 704),
}
PRETRAINED_IMAGENET = "imagenet"  # model.backbone.pretrained value: torchvision's ImageNet weights (torch hub cache)


class ConfigError(UserError, ValueError):
    """A configuration problem, with the offending key named in the message."""


# ----------------------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    size: str = "1.0x"  # ShuffleNetV2 width multiplier: 0.5x | 1.0x | 1.5x
    out_stages: list[int] = field(default_factory=lambda: [2, 3, 4])
    # ImageNet init: null (official init only) | imagenet (torchvision's weights for this width, from the torch
    # hub cache, downloaded there when missing; the official presets) | path to a torchvision-layout state dict.
    # null here (not the official recipe's imagenet) so that code building ModelConfig() never needs weights.
    pretrained: str | None = None


@dataclass
class NeckConfig:  # GhostPAN; in_channels follow from backbone.size, extra levels from head.strides
    out_channels: int = 96
    kernel_size: int = 5


@dataclass
class HeadConfig:  # NanoDetPlusHead
    feat_channels: int = 96
    stacked_convs: int = 2
    kernel_size: int = 5
    strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    reg_max: int = 7


@dataclass
class AuxHeadConfig:  # SimpleConvHead of the Assign Guidance Module; input = 2 * neck.out_channels
    feat_channels: int = 192
    stacked_convs: int = 4
    num_groups: int = 32  # GroupNorm groups


@dataclass
class AssignerConfig:  # DynamicSoftLabelAssigner
    topk: int = 13
    iou_factor: float = 3.0


@dataclass
class LossConfig:
    qfl_beta: float = 2.0
    qfl_weight: float = 1.0
    dfl_weight: float = 0.25
    giou_weight: float = 2.0


@dataclass
class ModelConfig:
    num_classes: int = 80
    detach_epoch: int = 10
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    aux_head: AuxHeadConfig = field(default_factory=AuxHeadConfig)
    assigner: AssignerConfig = field(default_factory=AssignerConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# ------------------------------------------------------------------------------------------ data
@dataclass
class BuiltinDataConfig:  # the deterministic generated dataset (pipeline/data/generate.py)
    num_train: int = 800
    num_val: int = 200
    image_size: list[int] = field(default_factory=lambda: [320, 320])  # [width, height]
    seed: int = 0
    max_objects: int = 8
    empty_fraction: float = 0.05
    min_object_px: float = 7.0  # smallest object side drawn, in generated-image pixels


@dataclass
class AugmentConfig:  # official train pipeline (spec section 10), done with albumentations
    scale: list[float] = field(default_factory=lambda: [0.6, 1.4])
    stretch: list[float] = field(default_factory=lambda: [0.8, 1.2])
    translate: float = 0.2
    flip: float = 0.5
    brightness: float = 0.2
    contrast: list[float] = field(default_factory=lambda: [0.6, 1.4])
    saturation: list[float] = field(default_factory=lambda: [0.5, 1.2])
    min_visibility: float = 0.0
    min_size: float = 1.0  # pixels; boxes smaller than this after augmentation are dropped (counted)
    multi_scale: list[float] | None = None  # e.g. [0.75, 1.25]: random input-size factor per batch


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin | auto (detect coco / yolo / voc from data.root) | coco | yolo | voc
    root: str | None = None  # dataset folder for auto / coco / yolo / voc
    train_ann: str | None = None  # coco: annotation json of the training split (relative to root)
    val_ann: str | None = None  # coco: annotation json of the validation split; None -> seeded split
    test_ann: str | None = None  # coco: annotation json of a test split (None -> test.json etc. if present)
    ann_dir: str | None = None  # voc: folder of the XML files (relative to root); None -> found under root
    img_dir: str | None = None  # voc: folder of the images (relative to root); None -> next to / beside the XML
    class_names: list[str] = field(default_factory=list)  # empty -> taken from the data (builtin, coco)
    prepared_dir: str = "data/prepared"
    val_fraction: float = 0.1
    test_fraction: float = 0.0  # > 0: hold out a seeded test split when the data has none
    split_seed: int = 0
    strict: bool = False  # every validation warning becomes fatal
    input_size: list[int] = field(default_factory=lambda: [320, 320])  # [width, height]
    keep_ratio: bool = False  # letterbox instead of stretch resize
    mean: list[float] = field(default_factory=lambda: [103.53, 116.28, 123.675])  # BGR
    std: list[float] = field(default_factory=lambda: [57.375, 57.12, 58.395])
    batch_size: int = 96  # per rank
    eval_batch_size: int = 32
    num_workers: int = 4
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# ----------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    epochs: int = 300
    max_steps: int | None = None  # stop after this many optimizer steps (tests, smoke runs)
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_scale_batch: int | None = None  # scale lr by global_batch / lr_scale_batch
    warmup_steps: int = 500
    warmup_ratio: float = 1e-4
    min_lr: float = 5e-5
    grad_clip: float = 35.0
    ema: bool = True
    ema_decay: float = 0.9998
    ema_ramp_steps: int = 2000
    val_interval: int = 10  # epochs
    save_interval_steps: int = 0  # 0: last.pt only at epoch end
    resume: str = "auto"  # auto | never | path/to/last.pt
    # what resume=auto does when last.pt was made with another config: error (refuse when the model
    # differs, continue otherwise) | restart (any model/data/train difference: move the old run to
    # <out_dir>/previous/<time>/ and start fresh; what the DVC train stage uses)
    on_config_change: str = "error"
    init_from: str | None = None  # weights to fine-tune from (.pt of ours, official .ckpt/.pth)
    patience: int = 0  # early stopping in validations without improvement; 0 = off
    max_nonfinite: int = 5  # consecutive skipped non-finite steps before stopping
    amp: str = "auto"  # auto (CUDA: bf16, else fp16; CPU: bf16 with AVX512-BF16/AMX-BF16, else off) | off | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    deterministic: bool = False
    sync_bn: bool = False
    channels_last: bool = False
    compile: bool = False
    dist_timeout_s: int = 600
    log_interval: int = 50
    nproc: int = 1  # processes per node when the DVC stage launches torchrun


# ------------------------------------------------------------------------------------------ eval
@dataclass
class EvalConfig:
    checkpoint: str = "runs/train/best.pt"  # .pt, .onnx, or an exported .xml (OpenVINO) / .param (NCNN) / .mnn
    out_dir: str = "runs/evaluate"
    score_thr: float = 0.05
    iou_thr: float = 0.6
    max_dets: int = 100
    confusion_iou: float = 0.5
    confusion_score: float = 0.3
    num_vis_images: int = 16
    split: str = "val"  # prepared split scored by `python -m pipeline.evaluate`: train | val | test


# ---------------------------------------------------------------------------------------- export
# export.formats: ONNX (onnxruntime), OpenVINO (.xml + .bin), NCNN (.param + .bin), MNN (.mnn)
EXPORT_FORMATS = ("onnx", "openvino", "ncnn", "mnn")


@dataclass
class ExportConfig:
    checkpoint: str = "runs/train/best.pt"
    out_dir: str = "runs/export"
    opset: int = 17
    decode_in_graph: bool = False  # False: raw [B, N, C + 4(R+1)] like the official export
    dynamic_batch: bool = True
    verify_images: int = 16
    atol: float = 1e-3
    map_tolerance: float = 0.002
    int8: bool = False
    calib_images: int = 64
    int8_max_map_drop: float = 0.01  # the stage fails when INT8 mAP is more than this below the fp32 ONNX mAP
    # onnx is always written (the others are converted from it); see EXPORT_FORMATS
    formats: list[str] = field(default_factory=lambda: ["onnx"])


# --------------------------------------------------------------------------------------- predict
@dataclass
class PredictConfig:
    source: str | None = None  # an image, a folder of images or a video file
    checkpoint: str | None = None  # as eval.checkpoint; None -> eval.checkpoint
    out_dir: str = "runs/predict"
    score_thr: float | None = None  # None -> eval.score_thr
    save_images: bool = True


# -------------------------------------------------------------------------------------- tracking
@dataclass
class TrackingConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "nanodet-pipeline"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    dir: str = "runs"  # W&B writes <dir>/wandb
    num_images: int = 8  # validation images logged with boxes
    init_timeout_s: int = 30


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


CHOICES = {
    "model.backbone.size": tuple(BACKBONE_CHANNELS),
    "data.source": ("builtin", "auto", "coco", "yolo", "voc"),
    "eval.split": ("train", "val", "test"),
    "train.amp": ("auto", "off", "bf16", "fp16"),
    "train.on_config_change": ("error", "restart"),
    "tracking.mode": ("auto", "online", "offline", "disabled"),
}


# ------------------------------------------------------------------------------- schema checking
def _valid_keys(schema: Any, path: list[str]) -> list[str]:
    node = schema
    for part in path:
        node = next((getattr(node, f.name) for f in fields(node) if f.name == part), None)
        if node is None or not is_dataclass(node):
            return []
    return [f.name for f in fields(node)]


def is_section(key: str) -> bool:
    """``model.head`` -> True (a group of keys), ``model.head.reg_max`` -> False (a value)."""
    return bool(_valid_keys(Config(), key.split(".")))


def _unknown_key_message(full_key: str) -> str:
    parts = full_key.split(".")
    valid = _valid_keys(Config(), parts[:-1])
    close = difflib.get_close_matches(parts[-1], valid, n=1, cutoff=0.5)
    prefix = ".".join(parts[:-1])
    hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
    where = f"'{prefix}'" if prefix else "the top level"
    return f"Unknown config key '{full_key}'.{hint} Valid keys under {where}: {', '.join(valid)}."


def unknown_key(key: str) -> str | None:
    """THE unknown-key check (validation, command-line overrides, sweep files): None when every part of the
    dotted ``key`` is in the schema, else the message for the first part that is not, with the closest
    valid key ("Did you mean ...") and the valid keys at that level."""
    parts = key.split(".")
    for i in range(len(parts)):
        if parts[i] not in _valid_keys(Config(), parts[:i]):
            return _unknown_key_message(".".join(parts[: i + 1]))
    return None


def _check_unknown(node: Any, schema: Any, prefix: str) -> None:
    """Walk the user config and raise on the first key the schema lacks (with a suggestion)."""
    if not isinstance(node, DictConfig) or not is_dataclass(schema):
        return
    names = {f.name for f in fields(schema)}
    for key in node:
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(unknown_key(full) or full)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _check_unknown(child, getattr(schema, key), full + ".")


def validate(cfg: Any) -> Config:
    """Merge a composed config onto the schema; raise ConfigError naming the key on any problem.

    Returns a read-only structured OmegaConf object that behaves like :class:`Config`.
    """
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    _check_unknown(cfg, Config(), "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        OmegaConf.resolve(merged)
    except (ValidationError, ConfigKeyError, ConfigAttributeError) as err:
        key = getattr(err, "full_key", None) or "?"
        detail = str(err.msg if hasattr(err, "msg") else err).strip().splitlines()  # drop OmegaConf's key dump
        raise ConfigError(f"Invalid value for config key '{key}': {detail[0] if detail else type(err).__name__}"
                          ) from None
    check_consistency(merged)
    OmegaConf.set_readonly(merged, True)
    return merged  # type: ignore[return-value]


def _fail(keys: str, msg: str) -> None:
    raise ConfigError(f"{keys}: {msg}")


def check_consistency(cfg: Config) -> None:
    """Cross-field checks, all in one place. Each error names the keys involved."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            _fail(key, f"'{value}' is not one of {list(allowed)}.{hint}")
    m, d, t = cfg.model, cfg.data, cfg.train
    pretrained = m.backbone.pretrained  # a bare word close to 'imagenet' that is no file: a typo of it
    if (pretrained and pretrained != PRETRAINED_IMAGENET and not any(c in pretrained for c in "/\\.")
            and not os.path.exists(pretrained)
            and difflib.get_close_matches(pretrained.lower(), [PRETRAINED_IMAGENET], n=1, cutoff=0.75)):
        _fail("model.backbone.pretrained", f"'{pretrained}' is neither '{PRETRAINED_IMAGENET}' nor an existing "
              f"file. Did you mean '{PRETRAINED_IMAGENET}'? (null: no ImageNet weights; a path: a local state dict)")
    if m.num_classes < 1:
        _fail("model.num_classes", f"must be >= 1, got {m.num_classes}")
    if d.class_names and len(d.class_names) != m.num_classes:
        _fail("data.class_names / model.num_classes",
              f"{len(d.class_names)} class names {list(d.class_names)} but num_classes={m.num_classes}; "
              "make them agree (set model.num_classes to the number of names)")
    if len(set(d.class_names)) != len(d.class_names):
        _fail("data.class_names", f"duplicate class names in {list(d.class_names)}")
    if list(m.backbone.out_stages) != [2, 3, 4]:
        _fail("model.backbone.out_stages", f"GhostPAN needs stages [2, 3, 4], got {list(m.backbone.out_stages)}")
    strides = list(m.head.strides)
    if len(strides) < 3 or strides[:3] != [8, 16, 32] or any(b != 2 * a for a, b in itertools.pairwise(strides)):
        _fail("model.head.strides",
              f"{strides} does not match the neck levels: the backbone gives strides 8, 16, 32 and each "
              "extra GhostPAN level doubles the last one, e.g. [8, 16, 32], [8, 16, 32, 64] or [8, 16, 32, 64, 128]")
    if m.head.reg_max < 1:
        _fail("model.head.reg_max", f"must be >= 1, got {m.head.reg_max}")
    widths = {"model.neck.out_channels": m.neck.out_channels, "model.head.feat_channels": m.head.feat_channels,
              "model.aux_head.feat_channels": m.aux_head.feat_channels}
    for key, value in widths.items():
        if value < 1:
            _fail(key, f"must be positive, got {value}")
    if m.aux_head.feat_channels % m.aux_head.num_groups:
        _fail("model.aux_head.feat_channels / model.aux_head.num_groups",
              f"GroupNorm needs feat_channels ({m.aux_head.feat_channels}) divisible by num_groups "
              f"({m.aux_head.num_groups})")
    if m.head.stacked_convs < 1 or m.aux_head.stacked_convs < 1:
        _fail("model.head.stacked_convs / model.aux_head.stacked_convs", "must be >= 1")
    if m.head.kernel_size % 2 == 0 or m.neck.kernel_size % 2 == 0:
        _fail("model.head.kernel_size / model.neck.kernel_size", "must be odd")
    if len(d.input_size) != 2 or min(d.input_size) < 1:
        _fail("data.input_size", f"must be [width, height] with positive values, got {list(d.input_size)}")
    # The backbone's deepest map (stride 32) must divide the input exactly: GhostPAN upsamples by 2 and
    # concatenates with the finer map. Extra levels (64, 128) use ceil(H / s) like the official code, which
    # is why the official 416 preset (416 / 64 = 6.5 -> 7x7) is valid.
    largest = min(strides[-1], 32)
    bad = [v for v in d.input_size if v % largest]
    if bad:
        _fail("data.input_size / model.head.strides",
              f"input size {list(d.input_size)} is not divisible by the largest backbone stride {largest}; "
              f"use multiples of {largest} (e.g. {[max(largest, round(v / largest) * largest) for v in d.input_size]})")
    for key in ("batch_size", "eval_batch_size"):
        if getattr(d, key) < 1:
            _fail(f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
    if d.num_workers < 0:
        _fail("data.num_workers", f"must be >= 0, got {d.num_workers}")
    if not 0.0 < d.val_fraction < 1.0:
        _fail("data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    if not 0.0 <= d.test_fraction < 1.0 or d.val_fraction + d.test_fraction >= 1.0:
        _fail("data.test_fraction", f"must be in [0, 1) with data.val_fraction + data.test_fraction < 1, got "
              f"test_fraction={d.test_fraction}, val_fraction={d.val_fraction}")
    if d.source != "builtin" and not d.root:
        _fail("data.root", f"data.source={d.source} needs data.root (the dataset folder)")
    if d.source == "builtin" and d.root:
        _fail("data.root / data.source", f"data.root='{d.root}' is set but data.source=builtin generates its own "
              "data and would ignore it; add data=auto (or data.source=auto|coco|yolo|voc) to read that folder")
    if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
        _fail("data.mean / data.std", "need 3 values each (BGR) and positive std")
    if t.epochs < 1:
        _fail("train.epochs", f"must be >= 1, got {t.epochs}")
    if t.max_steps is not None and t.max_steps < 1:
        _fail("train.max_steps", f"must be >= 1 or null, got {t.max_steps}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        _fail("train.lr / train.min_lr", f"need 0 <= min_lr <= lr and lr > 0, got lr={t.lr}, min_lr={t.min_lr}")
    if t.val_interval < 1:
        _fail("train.val_interval", f"must be >= 1, got {t.val_interval}")
    if t.nproc < 1:
        _fail("train.nproc", f"must be >= 1, got {t.nproc}")
    if not 0.0 <= t.ema_decay < 1.0:
        _fail("train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    if m.detach_epoch < 0:
        _fail("model.detach_epoch", f"must be >= 0, got {m.detach_epoch}")
    drop = cfg.export.int8_max_map_drop
    if not 0.0 <= drop <= 1.0:
        _fail("export.int8_max_map_drop", f"must be in [0, 1] (an mAP difference), got {drop}")
    formats = list(cfg.export.formats)
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad or not formats or len(set(formats)) != len(formats):
        close = difflib.get_close_matches(str(bad[0]), EXPORT_FORMATS, n=1) if bad else []
        hint = f" Did you mean '{close[0]}'?" if close else ""
        _fail("export.formats", f"{formats}: each must be one of {list(EXPORT_FORMATS)}, listed once, at least one."
              f"{hint} e.g. export.formats=[onnx,openvino]")


# ---------------------------------------------------------------------------------- composition
def compose(overrides: list[str] | None = None, config_name: str = "config", config_dir: Path | str | None = None) -> Config:
    """Compose ``conf/`` with Hydra (outside @hydra.main) and validate it.

    Used by tests, Ray trials and anything that is not itself a Hydra entry point.
    """
    from hydra import compose as hydra_compose  # hydra only to compose: the schema alone imports fast
    from hydra import initialize_config_dir  # (hydra: see above)
    from hydra.core.global_hydra import GlobalHydra  # (hydra: see above)
    from hydra.errors import ConfigCompositionException  # (hydra: see above)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir or CONF_DIR).resolve()), version_base="1.3"):
        try:
            raw = hydra_compose(config_name=config_name, overrides=list(overrides or []))
        except ConfigCompositionException as err:
            msg = str(err.__cause__ or err)
            problem = _unknown_override(msg, overrides or [])
            if problem:
                raise ConfigError(problem) from None
            raise ConfigError(f"Could not compose the config with overrides {overrides}: {msg}") from None
    return validate(raw)


def _unknown_override(msg: str, overrides: list[str]) -> str | None:
    """The unknown-key message for the override Hydra complained about, when its key is not in the schema."""
    for ov in overrides:
        key = ov.lstrip("+~").split("=", 1)[0]
        problem = unknown_key(key) if key in msg else None
        if problem:
            return problem
    return None


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of the resolved config (for checkpoints, W&B, ONNX metadata)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(data: dict) -> Config:
    """Rebuild and validate a config stored in a checkpoint."""
    return validate(OmegaConf.create(data))


def config_hash(cfg: Config | dict, section: str | None = None) -> str:
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    if section:
        data = data[section]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for refusing incompatible checkpoints)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return out


# ------------------------------------------------------------------------------- Hydra run dirs
def _run_id() -> str:
    """One id shared by all torchrun ranks (TORCHELASTIC_RUN_ID), else a timestamp."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID")
    if rid and rid != "none":
        return rid
    return time.strftime("%Y-%m-%d_%H-%M-%S")


SCHEMA_YAML = CONF_DIR / "schema.yaml"
HEADER = "# GENERATED by `python -m pipeline.config --write` from pipeline/config.py: the schema defaults\n" \
         "# (official NanoDet-Plus-m 320 recipe). Do not edit; tests fail when it drifts.\n"


def schema_yaml() -> str:
    """Every key of the schema with its default, as YAML: the base of conf/config.yaml. A plain YAML file
    (not a ConfigStore entry) so that DVC's own Hydra composition (``dvc exp run -S``) sees every key too."""
    return HEADER + OmegaConf.to_yaml(OmegaConf.structured(Config))


def params_yaml() -> str:
    """What ``dvc repro`` reads: conf/ composed with no overrides (``dvc exp run -S`` rewrites it)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(compose([]))))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", _run_id, use_cache=True)
    if not OmegaConf.has_resolver("rank"):
        OmegaConf.register_new_resolver("rank", lambda: os.environ.get("RANK", "0"), use_cache=True)


register_resolvers()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write conf/schema.yaml and params.yaml from the schema.")
    parser.add_argument("--write", action="store_true", help="rewrite conf/schema.yaml and params.yaml")
    args = parser.parse_args(argv)
    if args.write:
        SCHEMA_YAML.write_text(schema_yaml())
        (CONF_DIR.parent / "params.yaml").write_text(params_yaml())
        print(f"wrote {SCHEMA_YAML} and {CONF_DIR.parent / 'params.yaml'}")
    else:
        print(schema_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
