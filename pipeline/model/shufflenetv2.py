"""ShuffleNetV2 backbone (Ma et al., 2018) as configured in NanoDet-Plus (spec section 3).

Stem (3x3 s2 conv + BN + act, 3x3 s2 max-pool), then stages 2-4 of [4, 8, 4] ShuffleV2 blocks; no conv5.
Returns the outputs of ``out_stages`` (strides 8, 16, 32). Activation is LeakyReLU(0.1) and the
weights are initialised like the official code. ``cfg.model.backbone.pretrained`` then loads ImageNet
weights in torchvision's key layout: ``imagenet`` takes torchvision's own ShuffleNetV2 weights for the
configured width through its weights API (the torch hub cache, ``$TORCH_HOME/hub/checkpoints``,
downloaded there when missing), a path reads a local file. Both go through :meth:`ShuffleNetV2.load_pretrained`
(one key mapping: torchvision's names are ours; its ``conv5``/``fc`` are skipped, as in NanoDet).
"""
from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models
from torch import nn

from pipeline.config import BACKBONE_CHANNELS, PRETRAINED_IMAGENET
from pipeline.errors import UserError
from pipeline.model.layers import DepthwiseConv2d, activation

log = logging.getLogger(__name__)

STAGE_REPEATS = (4, 8, 4)
TORCHVISION_ONLY = ("conv5.", "fc.")  # torchvision's head layers, which NanoDet does not use
IMAGENET = PRETRAINED_IMAGENET  # the model.backbone.pretrained value for torchvision's ImageNet weights
IMAGENET_WEIGHTS = {  # model.backbone.size -> torchvision.models weights enum (member IMAGENET1K_V1)
    "0.5x": "ShuffleNet_V2_X0_5_Weights",
    "1.0x": "ShuffleNet_V2_X1_0_Weights",
    "1.5x": "ShuffleNet_V2_X1_5_Weights",
}
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: an unreachable server fails in seconds, not minutes


class PretrainedWeightsError(UserError, ValueError):
    """The ImageNet backbone file is missing, unreadable or does not fit the configured width."""


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H, W] with channels interleaved across ``groups`` (C = groups * k).

    A channels_last input stays channels_last (``torch.channel_shuffle``, the same permutation): the
    view/transpose/contiguous form would turn every block's output back into NCHW, and each following
    conv would then pay a layout conversion. The plain form is kept for NCHW (ONNX export, parity).
    """
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channel_shuffle(x, groups)
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return DepthwiseConv2d(channels, 3, stride=stride, padding=1)


def _pointwise(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class ShuffleV2Block(nn.Module):
    """One ShuffleNetV2 unit; stride 2 halves the map and uses both branches, stride 1 splits channels.

    Index layout of ``branch1``/``branch2`` matches torchvision (activation slots hold no weights),
    so ImageNet and official NanoDet keys load directly.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleV2Block stride must be 1 or 2, got {stride}")
        branch = out_channels // 2
        if stride == 1 and in_channels != 2 * branch:
            raise ValueError(f"stride-1 ShuffleV2Block needs in_channels == out_channels, "
                             f"got {in_channels}, {out_channels}")
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise(in_channels, stride), nn.BatchNorm2d(in_channels),
                _pointwise(in_channels, branch), nn.BatchNorm2d(branch), activation(),
            )
        self.branch2 = nn.Sequential(
            _pointwise(in_channels if stride > 1 else branch, branch), nn.BatchNorm2d(branch), activation(),
            _depthwise(branch, stride), nn.BatchNorm2d(branch),  # no activation after the depthwise conv
            _pointwise(branch, branch), nn.BatchNorm2d(branch), activation(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Cin, H, W] -> [B, Cout, H/stride, W/stride] (ceil)"""
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """Backbone returning a tuple of the ``out_stages`` maps: stage2/3/4 at strides 8/16/32."""

    def __init__(self, model_size: str = "1.0x", out_stages: tuple[int, ...] = (2, 3, 4)):
        super().__init__()
        if model_size not in BACKBONE_CHANNELS:
            raise ValueError(f"ShuffleNetV2 model_size {model_size!r} is not one of {list(BACKBONE_CHANNELS)}")
        if not out_stages or any(s not in (2, 3, 4) for s in out_stages):
            raise ValueError(f"out_stages must be a non-empty subset of (2, 3, 4), got {list(out_stages)}")
        self.model_size = model_size
        self.out_stages = tuple(out_stages)
        channels = BACKBONE_CHANNELS[model_size]
        self.out_channels = [channels[s - 1] for s in self.out_stages]
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            activation(),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = channels[0]
        for stage, (repeats, out_ch) in enumerate(zip(STAGE_REPEATS, channels[1:]), start=2):
            blocks = [ShuffleV2Block(in_ch, out_ch, 2)]
            blocks += [ShuffleV2Block(out_ch, out_ch, 1) for _ in range(repeats - 1)]
            setattr(self, f"stage{stage}", nn.Sequential(*blocks))
            in_ch = out_ch
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """Official init: conv ~ N(0, 1/weight.shape[1]) (depthwise: std 1), BN weight 1, bias 1e-4."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 1.0 / module.weight.shape[1])
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0.0)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 1e-4)
                nn.init.constant_(module.running_mean, 0.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, 3, H, W] -> maps of the out_stages, e.g. ([B,116,H/8,W/8], [B,232,H/16,..], [B,464,H/32,..])"""
        x = self.maxpool(self.conv1(x))
        outputs = []
        for stage in (2, 3, 4):
            x = getattr(self, f"stage{stage}")(x)
            if stage in self.out_stages:
                outputs.append(x)
            if stage >= max(self.out_stages):
                break
        return tuple(outputs)

    def load_pretrained(self, source: str | Path) -> int:
        """Load ImageNet weights into the backbone; returns the number of tensors loaded.

        ``source`` is ``"imagenet"`` (torchvision's weights for this width, from the torch hub cache,
        downloaded when missing) or a local state dict in torchvision's key layout. torchvision's
        ``conv5.*``/``fc.*`` entries are skipped (NanoDet has no conv5); every other key must exist here
        with the same shape, and every backbone weight must be in the file (BatchNorm
        ``num_batches_tracked`` counters, which older torchvision files lack, may be absent).
        """
        if str(source) == IMAGENET:
            cached = imagenet_cache_file(self.model_size)
            state, label = _read_imagenet_state_dict(self.model_size), f"{IMAGENET} ({cached})"
        else:
            state, label = _read_state_dict(Path(source)), str(source)
        own = self.state_dict()
        skipped = [k for k in state if k not in own and k.startswith(TORCHVISION_ONLY)]
        unexpected = [k for k in state if k not in own and not k.startswith(TORCHVISION_ONLY)]
        mismatched = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
                      for k in state if k in own and state[k].shape != own[k].shape]
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        if unexpected or mismatched or missing:
            parts = []
            if mismatched:
                parts.append(f"shape mismatches (is the file for another width than {self.model_size}?): "
                             + "; ".join(mismatched[:5]))
            if missing:
                parts.append(f"{len(missing)} backbone keys missing, e.g. {missing[:3]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
            raise PretrainedWeightsError(
                f"model.backbone.pretrained={label}: does not fit ShuffleNetV2 {self.model_size}: "
                + " | ".join(parts)
                + ". Expected torchvision's shufflenet_v2_x" + self.model_size[:-1].replace(".", "_")
                + " ImageNet state dict (keys conv1.0.weight, stage2.0.branch1.0.weight, ...).")
        fitting = {k: v for k, v in state.items() if k in own}
        self.load_state_dict(fitting, strict=False)
        counters = len(own) - len(fitting)  # only num_batches_tracked can be absent here (checked above)
        log.info("ShuffleNetV2 %s backbone: loaded %d of its %d tensors from %s%s; skipped %d torchvision-only "
                 "keys (%s)", self.model_size, len(fitting), len(own), label,
                 f" ({counters} BatchNorm num_batches_tracked counters not in the file stay 0)" if counters else "",
                 len(skipped), ", ".join(skipped) or "none")
        return len(fitting)


def imagenet_weights(model_size: str):  # -> torchvision.models.WeightsEnum member
    """torchvision's ImageNet weights (``IMAGENET1K_V1``) of the ShuffleNetV2 with this width."""
    name = IMAGENET_WEIGHTS.get(model_size)
    if name is None:
        raise PretrainedWeightsError(
            f"model.backbone.pretrained={IMAGENET}: no torchvision ImageNet weights for model.backbone.size="
            f"{model_size!r}; sizes with weights: {list(IMAGENET_WEIGHTS)}. Use one of them, a local file, "
            "or model.backbone.pretrained=null.")
    return getattr(torchvision.models, name).IMAGENET1K_V1


def imagenet_cache_file(model_size: str) -> Path:
    """Where torch.hub keeps (and looks for) the weights: ``torch.hub.get_dir()/checkpoints/<url file name>``."""
    url = imagenet_weights(model_size).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torch.hub's urlopen has no timeout: bound each socket operation unless the user already set a default."""
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _read_imagenet_state_dict(model_size: str) -> dict[str, torch.Tensor]:
    """torchvision's weights API: the cached file, or a download into the cache (hash-checked), read with
    ``weights_only=True``. Offline with an empty cache: one error naming the file, its folder and the URL."""
    weights = imagenet_weights(model_size)
    cached = imagenet_cache_file(model_size)
    was_cached = cached.is_file()
    if not was_cached:
        log.info("downloading torchvision's ShuffleNetV2 %s ImageNet weights %s -> %s", model_size, weights.url,
                 cached)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - URLError, timeout, hash mismatch, unreadable file: one message
        detail = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if not cached.is_file():
            raise PretrainedWeightsError(
                f"model.backbone.pretrained={IMAGENET}: torchvision's ShuffleNetV2 {model_size} ImageNet weights "
                f"are not in the torch hub cache and the download failed ({detail}). Fetch {weights.url} on a "
                f"machine with internet and place it as {cached} (folder {cached.parent}: $TORCH_HOME/hub/"
                "checkpoints, TORCH_HOME defaults to ~/.cache/torch), or set model.backbone.pretrained to a "
                "local copy of the file, or to null to train from scratch.") from None
        if _looks_like_torch_file(cached) and ("weights_only" in str(err) or "Unsupported global" in str(err)):
            raise PretrainedWeightsError(
                f"model.backbone.pretrained={IMAGENET}: the cached {cached} holds pickled Python objects, which "
                f"are not loaded because unpickling can run arbitrary code. Delete it and rerun to download "
                f"{weights.url} again.") from None
        raise PretrainedWeightsError(
            f"model.backbone.pretrained={IMAGENET}: the cached {cached} cannot be read as a plain tensor state "
            f"dict ({detail}). Delete it and rerun to download {weights.url} again (or place a good copy "
            "there).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"model.backbone.pretrained={IMAGENET}: the cached {cached} is not a dict of "
                                     f"tensors (a state dict). Delete it and rerun to download {weights.url} again.")
    return dict(state)


def _looks_like_torch_file(path: Path) -> bool:
    """A torch.save zip archive or a legacy pickle (protocol 2+ starts with 0x80): junk is not 'pickled objects'."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(
            f"model.backbone.pretrained={path}: file not found. Put torchvision's ShuffleNetV2 ImageNet "
            f"weights there, or set model.backbone.pretrained={IMAGENET} to take them from the torch hub cache "
            "(downloaded when missing), or null to train from scratch.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling/format problem gets the same advice
        if _looks_like_torch_file(path) and ("weights_only" in str(err) or "Unsupported global" in str(err)):
            raise PretrainedWeightsError(
                f"model.backbone.pretrained={path}: holds pickled Python objects, which are not loaded because "
                "unpickling can run arbitrary code. Save only the tensors: torch.save(model.state_dict(), path)."
            ) from None
        raise PretrainedWeightsError(
            f"model.backbone.pretrained={path}: cannot be read as a plain tensor state dict ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). Save it with torch.save(model.state_dict(), path).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"model.backbone.pretrained={path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}
