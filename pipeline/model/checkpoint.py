"""Checkpoints: atomic saves, safe loads, and rebuilding a model from its own checkpoint (inference, fine-tuning).
Which checkpoint a training run resumes from is :mod:`pipeline.train.resume`.

A training checkpoint is a plain dict (loadable with ``torch.load(weights_only=True)``, i.e. only
tensors and Python primitives) with the keys "model", "ema" (state dicts), "optimizer",
"scheduler", "scaler", "epoch" (next epoch to run), "epoch_step" (batches of that epoch already
done; > 0 for a mid-epoch checkpoint), "step" (global step), "rng", "config" (the resolved config,
plain dict), "tracking_run_id", "best_map", "nonfinite" and "world_size".

Saving writes a temporary file in the same folder, fsyncs it, moves the previous file to
``<name>.prev`` and renames the new one into place, then fsyncs the folder: a crash at any point
leaves either the new file or the previous one complete on disk.
"""
from __future__ import annotations

import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from pipeline import faults
from pipeline.config import Config, diff_keys, from_dict, to_dict
from pipeline.errors import UserError
from pipeline.io import atomic_write
from pipeline.logging import get_logger
from pipeline.model.detector import build_model
from pipeline.model.official import OfficialWeightsError, read_checkpoint, select_state_dict

log = get_logger(__name__)

PREV_SUFFIX = ".prev"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or incompatible; the message names the file."""


def save_checkpoint(path: str | os.PathLike, state: dict, keep_prev: bool = True) -> Path:
    """Atomically write ``state`` to ``path`` (:func:`pipeline.io.atomic_write`, fsynced); with ``keep_prev``
    the old file becomes ``path.prev``.

    An OSError (disk full, read-only or missing folder) becomes a CheckpointError naming the file; the
    previous checkpoint is then untouched. ``pipeline.faults`` can kill the process at each phase (tests).
    """
    path = Path(path)
    index = faults.next_save()
    try:
        atomic_write(path, lambda fh: torch.save(state, fh), binary=True, fsync=True,
                     keep_prev=PREV_SUFFIX if keep_prev else None,
                     on_phase=lambda phase, tmp: faults.checkpoint_point(phase, index, tmp))
    except OSError as err:
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err} ({type(err).__name__}); "
                              f"{kept}. Free disk space or point train.out_dir to a writable folder") from None
    return path


def verify_zip_crc(path: Path) -> None:
    """torch.save files are zip archives with a CRC-32 per record, which torch.load never checks: a flipped
    bit in a tensor would load silently. Check them (a few ms per 100 MB); CheckpointError on a mismatch."""
    if not zipfile.is_zipfile(path):
        return  # truncated (no zip directory) or the legacy format: torch.load decides
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(info.CRC for info in zf.infolist()):
                return  # written with torch.serialization.config.save.compute_crc32=False: nothing to check
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
                              f"{_first_line(err)}); delete it or point to another file") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its record '{bad}' fails the CRC-32 check (the file "
                              "changed after it was written: disk, copy or transfer error); delete it or point to "
                              "another file")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; any problem becomes a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    verify_zip_crc(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - damaged files raise KeyError, EOFError, RuntimeError...
        detail = _first_line(err)
        if isinstance(err, pickle.UnpicklingError) and "global" in str(err).lower():
            # the file asks to import a Python object (class, function): a pickled payload
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain Python values and was not "
                "loaded (unsafe pickled payload; only weights_only checkpoints are accepted). Re-save it "
                "with tensors and plain types only, or use a checkpoint written by pipeline.train") from None
        if isinstance(err, pickle.UnpicklingError):  # e.g. "Unsupported operand": not a torch.save file
            detail = _last_reason(err)
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated, or not a torch.save file "
                              f"({type(err).__name__}: {detail}); delete it or point to another file"
                              ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no detail"


def _last_reason(err: BaseException) -> str:
    """The specific line of torch's long weights_only message (e.g. 'Unsupported operand 110')."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip().startswith("Unsupported")]
    return lines[0][:200] if lines else _first_line(err)


def check_model_config(ckpt: dict, cfg: Config, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose stored model config differs from ``cfg.model``, naming the keys."""
    stored = (ckpt.get("config") or {}).get("model")
    if stored is None:
        raise CheckpointError(f"checkpoint {path} has no stored model config; it was not written by "
                              "pipeline.train (use train.init_from for foreign weights)")
    diffs = diff_keys(stored, to_dict(cfg)["model"], prefix="model.")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was trained with a different model config: {'; '.join(diffs)} "
            "(checkpoint value != current value). Use the same model settings to resume, set "
            "train.resume=never to start fresh, or fine-tune from it with train.init_from")


def model_state_for_inference(ckpt: dict, prefer_ema: bool = True) -> dict:
    """The state dict to run (EMA when present and preferred), without the training-only aux branch."""
    state = ckpt.get("ema") if prefer_ema and ckpt.get("ema") else ckpt.get("model")
    if not state:
        raise KeyError("model")
    return {k: v for k, v in state.items() if not k.startswith(("aux_fpn.", "aux_head."))}


def load_model_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu",
                             prefer_ema: bool = True) -> tuple[torch.nn.Module, Config]:
    """Rebuild the model (no aux branch, eval mode) from the config stored in a checkpoint of ours.

    Returns ``(model, cfg)`` where ``cfg`` is the stored config. Official NanoDet .ckpt/.pth files
    go through ``pipeline.model.official.load_official_weights`` instead.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no stored config; for an official NanoDet checkpoint "
                              "use pipeline.model.official.load_official_weights")
    try:
        cfg = from_dict(ckpt["config"])
    except Exception as err:  # noqa: BLE001 - a config written by an older schema
        raise CheckpointError(f"checkpoint {path}: its stored config does not validate: {err}") from None
    model = build_model(cfg.model, with_aux=False, load_pretrained=False)  # the checkpoint has every weight
    try:
        state = model_state_for_inference(ckpt, prefer_ema)
    except KeyError:
        raise CheckpointError(f"checkpoint {path} holds neither 'ema' nor 'model' weights") from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path} does not match the model built from its config: "
                              f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval(), cfg


def load_weights_for_finetune(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """``train.init_from``: copy matching tensors (EMA preferred) from a checkpoint of ours or an official
    NanoDet .ckpt/.pth into ``model``.

    Tensors whose shape differs (e.g. another number of classes) are skipped and listed, as the
    official ``load_model_weight`` does since its fix #288; missing ones (e.g. no aux branch in a
    ``.pth``) keep their initialisation. Returns {"loaded": n, "skipped": [...], "missing": [...]}.
    """
    path = Path(path)
    if path.suffix in (".ckpt", ".pth"):
        try:
            source, _ = select_state_dict(read_checkpoint(path), prefer_ema=True)
        except OfficialWeightsError as err:
            raise CheckpointError(f"train.init_from: {err}") from None
    else:
        ckpt = load_checkpoint(path)
        source = ckpt.get("ema") or ckpt.get("model")
        if not source:
            raise CheckpointError(f"train.init_from={path} holds neither 'ema' nor 'model' weights")
    own = model.state_dict()
    loadable, skipped = {}, []
    for key, value in source.items():
        if key in own and own[key].shape == value.shape:
            loadable[key] = value
        elif key in own:
            skipped.append(f"{key} {tuple(value.shape)} -> {tuple(own[key].shape)}")
    if not loadable:
        raise CheckpointError(f"train.init_from={path}: no tensor matches the current model "
                              f"(checkpoint keys e.g. {sorted(source)[:3]})")
    model.load_state_dict(loadable, strict=False)
    missing = sorted(set(own) - set(loadable))
    if skipped:
        log.warning("init_from %s: skipped %d tensors with other shapes: %s", path, len(skipped), skipped[:8])
    if missing:
        log.warning("init_from %s: %d model tensors not in the file keep their initialisation (e.g. %s)",
                    path, len(missing), missing[:4])
    log.info("init_from %s: loaded %d tensors", path, len(loadable))
    return {"loaded": len(loadable), "skipped": skipped, "missing": missing}
