"""Import weights of the official NanoDet-Plus code (RangiLyu/nanodet) into our model (spec section 14).

Accepted files (all read with ``torch.load(weights_only=True)``, never unpickling code):
* a Lightning ``.ckpt``: ``state_dict`` with ``model.*`` (trained) and ``avg_model.*`` (EMA) keys;
* ``nanodet_model_best.pth``: ``{"state_dict": {...}}`` without prefixes;
* a plain state dict, or our own checkpoint (``{"model": ..., "ema": ...}``).
``module.`` (DDP) prefixes are stripped. Key names are the official ones, so the mapping is the
identity; what this module adds is picking the right weights and refusing anything that does not fit.

CLI: ``python -m pipeline.model.official --checkpoint SRC --out OUT.pt [overrides...]`` writes
``{"model", "ema", "config"}`` usable as ``train.init_from=OUT.pt`` or for evaluation/export.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError, compose, to_dict
from pipeline.errors import UserError
from pipeline.io import atomic_write
from pipeline.model.decode import num_bins
from pipeline.model.detector import build_model

AUX_PREFIXES = ("aux_fpn.", "aux_head.")


class OfficialWeightsError(UserError, ValueError):
    """The file cannot be read safely, or its tensors do not fit the configured model."""


@dataclass
class ImportReport:
    path: str
    source: str  # which weights were taken: "avg_model" (EMA), "model", "state_dict", "ema", "plain"
    loaded: int  # tensors copied into the model
    skipped_aux: list[str] = field(default_factory=list)  # aux_* keys dropped for an inference model


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` with clear errors for missing, corrupt and pickled files."""
    path = Path(path)
    if not path.is_file():
        raise OfficialWeightsError(f"checkpoint {path}: file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - all load failures get the same kind of advice
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text or "Unpickler" in text:
            raise OfficialWeightsError(
                f"checkpoint {path}: contains pickled Python objects, which are not loaded because unpickling can "
                "run arbitrary code. If you trust the file, keep only its tensors with: python -c \"import torch; "
                f"c = torch.load('{path}', weights_only=False); torch.save({{'state_dict': c['state_dict']}}, "
                "'weights_only.pth')\" and import that file instead.") from None
        raise OfficialWeightsError(f"checkpoint {path}: not a readable torch file ({type(err).__name__}: "
                                   f"{text.splitlines()[0][:200] if text else ''})") from None
    if not isinstance(payload, dict):
        raise OfficialWeightsError(f"checkpoint {path}: expected a dict, got {type(payload).__name__}")
    return payload


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def select_state_dict(payload: dict, prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the weights in a loaded checkpoint; returns ``(state_dict without prefixes, source name)``.

    Lightning: ``avg_model.*`` (EMA) when present and ``prefer_ema``, else ``model.*``.
    """
    if _is_state_dict(payload.get("model")):  # our own checkpoint format
        if prefer_ema and _is_state_dict(payload.get("ema")):
            return dict(payload["ema"]), "ema"
        return dict(payload["model"]), "model"
    if isinstance(payload.get("state_dict"), dict):
        state, source = payload["state_dict"], "state_dict"
    elif _is_state_dict(payload):
        state, source = payload, "plain"
    else:
        raise OfficialWeightsError(f"no state dict found (top-level keys: {sorted(payload)[:10]})")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    has_ema = any(k.startswith("avg_model.") for k in state)
    has_model = any(k.startswith("model.") for k in state)
    if has_ema and (prefer_ema or not has_model):
        state, source = _strip(state, "avg_model."), "avg_model"
    elif has_model:
        state, source = _strip(state, "model."), "model"
    return {k.removeprefix("module."): v for k, v in state.items()}, source


def _architecture_hint(state: dict[str, torch.Tensor]) -> str:
    """What the checkpoint's own tensors say about num_classes / reg_max (for mismatch messages)."""
    project = state.get("head.distribution_project.project")
    out = state.get("head.gfl_cls.0.weight")
    if project is None or out is None:
        return ""
    reg_max = project.numel() - 1
    num_classes = out.shape[0] - num_bins(reg_max)
    levels = len({k.split(".")[2] for k in state if k.startswith("head.gfl_cls.")})
    return (f" The checkpoint looks like model.num_classes={num_classes}, model.head.reg_max={reg_max} with "
            f"{levels} head levels; set the config to match (or fine-tune from a checkpoint that does).")


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor],
                     path: str = "checkpoint") -> tuple[dict, list[str]]:
    """Check ``state`` against ``model``; returns ``(state to load, skipped aux keys)``.

    Aux keys are dropped when the model has no aux branch. Raises :class:`OfficialWeightsError`
    listing missing keys, unexpected keys and shape mismatches.
    """
    own = model.state_dict()
    with_aux = any(k.startswith(AUX_PREFIXES) for k in own)
    skipped = [] if with_aux else [k for k in state if k.startswith(AUX_PREFIXES)]
    state = {k: v for k, v in state.items() if not (k.startswith(AUX_PREFIXES) and not with_aux)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:6]))
        if missing:
            note = " (the file has no aux branch: build the model with with_aux=False)" \
                if with_aux and all(k.startswith(AUX_PREFIXES) for k in missing) else ""
            parts.append(f"{len(missing)} missing keys{note}: " + ", ".join(missing[:6]))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: " + ", ".join(unexpected[:6]))
        raise OfficialWeightsError(f"{path}: weights do not fit the configured model: " + " | ".join(parts)
                                   + "." + _architecture_hint(state))
    return state, skipped


def load_official_weights(model: nn.Module, path: str | Path, prefer_ema: bool = True) -> ImportReport:
    """Load an official (or plain / own) checkpoint into ``model`` in place; strict after aux filtering."""
    payload = read_checkpoint(path)
    try:
        state, source = select_state_dict(payload, prefer_ema)
    except OfficialWeightsError as err:
        raise OfficialWeightsError(f"checkpoint {path}: {err}") from None
    state, skipped = match_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return ImportReport(path=str(path), source=source, loaded=len(state), skipped_aux=skipped)


def convert(checkpoint: str | Path, out: str | Path, overrides: list[str]) -> ImportReport:
    """Import ``checkpoint`` into the model of ``compose(overrides)`` and save our checkpoint format.

    ``model`` gets the trained weights (``model.*``) and ``ema`` the EMA weights (``avg_model.*``) when
    the file has both; otherwise both hold the one set of weights in the file.
    """
    cfg = compose(overrides)
    model = build_model(cfg.model, with_aux=True, load_pretrained=False)  # every weight comes from the file
    report = load_official_weights(model, checkpoint, prefer_ema=True)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    trained = ema
    if report.source == "avg_model":
        load_official_weights(model, checkpoint, prefer_ema=False)
        trained = model.state_dict()
    out = Path(out)
    state = {"model": trained, "ema": ema, "config": to_dict(cfg), "epoch": 0, "step": 0,
             "imported_from": str(checkpoint)}
    atomic_write(out, lambda fh: torch.save(state, fh), binary=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.model.official", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official .ckpt / .pth or a plain state dict")
    parser.add_argument("--out", required=True, help="where to write the converted checkpoint (.pt)")
    parser.add_argument("overrides", nargs="*", help="Hydra-style config overrides, e.g. model.num_classes=80")
    args = parser.parse_args(argv)
    try:
        report = convert(args.checkpoint, args.out, args.overrides)
    except (OfficialWeightsError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"imported {report.loaded} tensors ({report.source}) from {report.path} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
