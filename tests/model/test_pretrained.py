"""model.backbone.pretrained=imagenet: torchvision's ShuffleNetV2 ImageNet weights through its weights API.

All offline: TORCH_HOME points at a temporary folder, the "ImageNet" file placed in its hub cache is a
state dict in torchvision's own key layout with recognisable (seeded random) values, and torch.hub's
download function is replaced, so no test touches the network.
"""
from __future__ import annotations

import logging
import socket
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.hub
import torchvision

from pipeline.config import ConfigError, compose
from pipeline.model import build_model
from pipeline.model.shufflenetv2 import DOWNLOAD_TIMEOUT_S, PretrainedWeightsError, imagenet_weights

# torchvision's file names (the last part of IMAGENET1K_V1.url) per model.backbone.size: a wrong width
# mapping would look for another file and fail the tests below
FILES = {"0.5x": "shufflenetv2_x0.5-f707e7126e.pth", "1.0x": "shufflenetv2_x1-5666bf0f80.pth",
         "1.5x": "shufflenetv2_x1_5-3c479a10.pth"}
BUILDERS = {"0.5x": torchvision.models.shufflenet_v2_x0_5, "1.0x": torchvision.models.shufflenet_v2_x1_0,
            "1.5x": torchvision.models.shufflenet_v2_x1_5}
TORCHVISION_ONLY = {"conv5.0.weight", "conv5.1.weight", "conv5.1.bias", "conv5.1.running_mean",
                    "conv5.1.running_var", "conv5.1.num_batches_tracked", "fc.weight", "fc.bias"}


def torchvision_state(size: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's own ShuffleNetV2 state dict for ``size`` with distinct seeded values in every tensor
    (each counter gets its own number), so a tensor loaded under the wrong key is noticed."""
    gen = torch.Generator().manual_seed(seed)
    state = BUILDERS[size](weights=None).state_dict()
    return {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else torch.tensor(1000 + i))
            for i, (k, v) in enumerate(state.items())}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache under a temporary TORCH_HOME; any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_download(url, dst, *args, **kwargs):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch" / "hub" / "checkpoints"


def place(hub: Path, size: str, state: dict[str, torch.Tensor], name: str | None = None) -> Path:
    hub.mkdir(parents=True, exist_ok=True)
    path = hub / (name or FILES[size])
    torch.save(state, path)
    return path


def assert_every_backbone_tensor_from(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    own = model.backbone.state_dict()
    assert set(source) - set(own) == TORCHVISION_ONLY  # the only keys torchvision has that we do not
    assert set(own) <= set(source)
    wrong = [k for k, v in own.items() if not torch.equal(v, source[k])]
    assert not wrong, f"{len(wrong)} of {len(own)} backbone tensors differ from the file, e.g. {wrong[:3]}"


@pytest.mark.parametrize("experiment, size", [("nanodet_plus_m_320", "1.0x"), ("nanodet_plus_m_1.5x_416", "1.5x")])
def test_official_presets_load_every_backbone_tensor_from_the_hub_cache(experiment, size, hub, caplog):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.model.backbone.pretrained == "imagenet" and cfg.model.backbone.size == size
    source = torchvision_state(size)
    place(hub, size, source)
    with caplog.at_level(logging.INFO, logger="pipeline.model.shufflenetv2"):
        model = build_model(cfg.model)
    assert_every_backbone_tensor_from(model, source)
    n = len(model.backbone.state_dict())
    assert f"loaded {n} of its {n} tensors" in caplog.text
    assert "skipped 8 torchvision-only keys" in caplog.text and "fc.weight" in caplog.text
    assert str(hub / FILES[size]) in caplog.text


def test_imagenet_with_the_small_width(hub):
    cfg = compose(["model=nanodet_plus_m_0.5x", "model.backbone.pretrained=imagenet"])
    source = torchvision_state("0.5x", seed=1)
    place(hub, "0.5x", source)
    assert_every_backbone_tensor_from(build_model(cfg.model, with_aux=False), source)


def test_demo_and_model_groups_need_no_weights():
    assert compose([]).model.backbone.pretrained is None  # the demo (default experiment)
    for model in ("nanodet_plus_m", "nanodet_plus_m_1.5x", "nanodet_plus_m_0.5x"):
        assert compose([f"model={model}"]).model.backbone.pretrained is None


def test_missing_file_is_downloaded_into_the_cache_with_hash_check_and_timeout(hub, monkeypatch):
    """What an online user gets: torch.hub downloads the file into the cache (hash-checked, with a socket
    timeout so a dead network cannot hang), then it is loaded from there."""
    source = torchvision_state("1.0x", seed=2)
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix, socket.getdefaulttimeout()))
        torch.save(source, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = build_model(compose(["experiment=nanodet_plus_m_416"]).model)
    assert calls == [(f"https://download.pytorch.org/models/{FILES['1.0x']}", str(hub / FILES["1.0x"]),
                      "5666bf0f80", DOWNLOAD_TIMEOUT_S)]
    assert socket.getdefaulttimeout() is None  # restored
    assert_every_backbone_tensor_from(model, source)


def test_offline_with_an_empty_cache_names_the_file_the_folder_and_the_url(hub, monkeypatch):
    attempts = []

    def offline(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = compose(["experiment=nanodet_plus_m_320"])
    with pytest.raises(PretrainedWeightsError) as info:
        build_model(cfg.model)
    msg = str(info.value)
    assert attempts == [f"https://download.pytorch.org/models/{FILES['1.0x']}"]
    assert "\n" not in msg and msg.startswith("model.backbone.pretrained=imagenet:")
    assert f"place it as {hub / FILES['1.0x']} (folder {hub}" in msg
    assert f"Fetch https://download.pytorch.org/models/{FILES['1.0x']}" in msg
    assert "URLError" in msg and "model.backbone.pretrained to a local copy" in msg
    assert not list(hub.glob("*"))  # no partial file left behind to be mistaken for the weights


def test_wrong_width_in_the_cache_is_a_clear_error(hub):
    place(hub, "1.0x", torchvision_state("0.5x"))  # a 0.5x file under the 1.0x name
    with pytest.raises(PretrainedWeightsError,
                       match=r"pretrained=imagenet \(.*shufflenetv2_x1-5666bf0f80\.pth\): does not fit ShuffleNetV2 "
                             r"1\.0x: shape mismatches \(is the file for another width than 1\.0x\?\)"):
        build_model(compose(["experiment=nanodet_plus_m_320"]).model)


def test_unreadable_cached_file_says_delete_and_rerun(hub):
    hub.mkdir(parents=True)
    (hub / FILES["1.5x"]).write_bytes(b"truncated download")
    with pytest.raises(PretrainedWeightsError, match=r"the cached .*shufflenetv2_x1_5-3c479a10\.pth cannot be read"
                                                     r".*Delete it and rerun to download https://"):
        build_model(compose(["experiment=nanodet_plus_m_1.5x_320"]).model)


class Payload:
    """A pickled object: with weights_only=False, loading the file would construct it."""


def test_cached_file_with_pickled_objects_is_refused(hub):
    place(hub, "0.5x", {**torchvision_state("0.5x"), "extra": Payload()})
    with pytest.raises(PretrainedWeightsError, match=r"the cached .*shufflenetv2_x0\.5-f707e7126e\.pth holds pickled "
                                                     r"Python objects.*Delete it"):
        build_model(compose(["model=nanodet_plus_m_0.5x", "model.backbone.pretrained=imagenet"]).model)


def test_width_without_weights_is_a_clear_error():
    assert imagenet_weights("1.5x").url.endswith(FILES["1.5x"])
    with pytest.raises(PretrainedWeightsError, match=r"model\.backbone\.size='2\.0x'.*\['0\.5x', '1\.0x', '1\.5x'\]"):
        imagenet_weights("2.0x")


def test_a_local_path_still_works(tmp_path, hub):
    source = torchvision_state("1.0x", seed=3)
    path = tmp_path / "my_shufflenet.pth"
    torch.save(source, path)
    model = build_model(compose(["experiment=nanodet_plus_m_320", f"model.backbone.pretrained={path}"]).model)
    assert_every_backbone_tensor_from(model, source)
    assert not hub.exists()  # the cache was not involved


def test_misspelled_imagenet_is_caught_by_the_config():
    with pytest.raises(ConfigError, match=r"model\.backbone\.pretrained: 'ImageNet' .*Did you mean 'imagenet'"):
        compose(["model.backbone.pretrained=ImageNet"])
    with pytest.raises(ConfigError, match="Did you mean 'imagenet'"):
        compose(["model.backbone.pretrained=imagenett"])


def test_models_rebuilt_from_a_checkpoint_never_need_the_imagenet_file(hub, tmp_path):
    """A model trained from ImageNet weights stores pretrained=imagenet in its config; evaluating, exporting or
    converting it overwrites every weight, so it must work with an empty hub cache (and no download)."""
    from pipeline.config import to_dict
    from pipeline.model.checkpoint import load_model_for_inference
    from pipeline.tune.driver import absolute_paths

    cfg = compose(["model=nanodet_plus_m_0.5x", "model.num_classes=2", "model.backbone.pretrained=imagenet"])
    weights = build_model(cfg.model, with_aux=False, load_pretrained=False).state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": weights, "ema": None, "config": to_dict(cfg)}, path)
    model = load_model_for_inference(path)[0]
    assert not any(hub.glob("*")), "nothing may be downloaded into the cache"
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in weights.items())
    # a sweep pins relative paths to absolute ones; the keyword stays a keyword
    pinned = [o for o in absolute_paths(["model.backbone.pretrained=imagenet"]) if o.startswith("model.backbone")]
    assert pinned == []
    pinned = [o for o in absolute_paths(["model.backbone.pretrained=w.pth"]) if o.startswith("model.backbone")]
    assert pinned == [f"model.backbone.pretrained={Path('w.pth').resolve()}"]
