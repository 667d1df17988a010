"""The offline encoders carry real ImageNet weights: they recognise a cat and a cup of coffee."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from captioner.encoders import OFFLINE_ENCODERS, create_encoder, list_encoders
from captioner.images import build_transform

skimage_data = pytest.importorskip("skimage.data")
CATS = {281, 282, 283, 284, 285, 287}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat, lynx
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.mark.parametrize("name", OFFLINE_ENCODERS)
def test_offline_weights_classify_real_photos(name):
    encoder = create_encoder(name)
    transform = build_transform(encoder.preprocess)
    batch = torch.stack(
        [
            transform(Image.fromarray(skimage_data.chelsea())),
            transform(Image.fromarray(skimage_data.coffee())),
        ]
    )
    top5 = encoder.classify(batch).topk(5).indices.tolist()
    assert CATS & set(top5[0]), f"{name}: chelsea (a cat) not in top 5: {top5[0]}"
    assert COFFEE & set(top5[1]), f"{name}: coffee not in top 5: {top5[1]}"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2", "resnet18"])
def test_pooled_and_grid_shapes(name):
    encoder = create_encoder(name, pretrained=False)
    size = encoder.preprocess.size
    pooled, grid = encoder(torch.zeros(2, 3, size, size))
    assert pooled.shape == (2, encoder.feature_dim)
    assert grid.shape == (2, (size // 32) ** 2, encoder.feature_dim)
    assert torch.allclose(grid.mean(1), pooled, atol=1e-5)


def test_registry_lists_the_classic_backbones():
    assert {"resnet50", "resnet101", "resnet152", "vgg16", "inception_v3", "xception"} <= set(list_encoders())
    with pytest.raises(KeyError, match="unknown encoder 'resnet9'"):
        create_encoder("resnet9")


def test_download_encoder_offline_gives_a_clear_error():
    # HF_HUB_OFFLINE makes the download fail at once, as it does on a machine without the internet.
    code = (
        "from captioner.encoders import create_encoder\n"
        "from captioner.errors import CaptionerError, EncoderWeightsError\n"
        "try:\n"
        "    create_encoder('resnet50')\n"
        "except EncoderWeightsError as e:\n"
        "    print('caught', isinstance(e, CaptionerError))\n"
        "    raise\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "EncoderWeightsError" in result.stderr
    assert "could not get ImageNet weights for 'resnet50.tv_in1k'" in result.stderr
    assert "efficientnet_lite0" in result.stderr  # it names the offline alternatives
    assert "caught True" in result.stdout  # the project's own error, which `captioner` prints as one line


@pytest.fixture
def torch_only(monkeypatch):
    monkeypatch.setenv("CAPTIONER_ENCODER_RUNTIME", "torch")  # the folded copy itself, not onnxruntime's


@pytest.mark.parametrize("name", [*OFFLINE_ENCODERS, "resnet18"])
def test_folded_encoder_matches_the_unfolded_one(name, torch_only):
    encoder = create_encoder(name, pretrained=name in OFFLINE_ENCODERS).eval()
    size = encoder.preprocess.size
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        folded = encoder(images)  # no gradients, eval mode: the folded copy
    assert encoder.__dict__["_folded"] is not None
    names = [type(m).__name__ for m in encoder.__dict__["_folded"].modules()]
    assert not {"BatchNorm2d", "BatchNormAct2d"} & set(names)  # every norm folded into its convolution
    assert names.count("Conv2dSame") == names.count("_SamePadConv")  # and every "same" conv wrapped
    plain = encoder(images)  # gradients on: the trainable backbone itself
    for a, b in zip(folded, plain, strict=True):
        assert torch.allclose(a, b.detach(), atol=1e-4, rtol=1e-4)
    assert not any("_folded" in key for key in encoder.state_dict())


def test_folded_copy_follows_mode_and_weights(torch_only):
    torch.manual_seed(0)
    encoder = create_encoder("mobilenet_v2", pretrained=False).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = encoder(images)[0]
        encoder.train()  # training mode: the backbone itself, batch statistics and all
        assert encoder.__dict__["_folded"] is None
        encoder.eval()
        halve = lambda k, v: v * 0.5 if v.is_floating_point() and "running_var" not in k else v  # noqa: E731
        state = {k: halve(k, v) for k, v in encoder.state_dict().items()}
        encoder(images)
        encoder.load_state_dict(state)  # new weights: refolded, never stale
        after = encoder(images)[0]
        encoder.__dict__["_folded"] = None
        assert not torch.allclose(before, after)
        plain = encoder.backbone.forward_features(images).mean(dim=(2, 3))
        torch.testing.assert_close(after, plain, atol=1e-4, rtol=1e-4)


def test_onnxruntime_runs_the_backbone_as_torch_does_and_caches_the_graph(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from captioner import ort_backbone

    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path))
    monkeypatch.setenv("CAPTIONER_ENCODER_RUNTIME", "onnxruntime")
    encoder = create_encoder("efficientnet_lite0", pretrained=True).eval()
    size = encoder.preprocess.size
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        encoder(images)
        fast = encoder(images)
    assert isinstance(encoder.__dict__["_ort"], ort_backbone.OrtBackbone)
    plain = encoder(images)  # gradients on: the trainable backbone in PyTorch
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-4, rtol=1e-4)
    (cached,) = (tmp_path / "encoders").glob("*.onnx")

    # another process with these weights loads the graph instead of tracing it again
    monkeypatch.setattr(ort_backbone, "export", lambda *a: pytest.fail("traced again"))
    again = create_encoder("efficientnet_lite0", pretrained=True).eval()
    with torch.no_grad():
        again(images)
        torch.testing.assert_close(again(images)[0], fast[0])
    assert isinstance(again.__dict__["_ort"], ort_backbone.OrtBackbone)

    # a damaged entry is traced again; the switch turns it all off
    monkeypatch.undo()
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path))
    monkeypatch.setenv("CAPTIONER_ENCODER_RUNTIME", "onnxruntime")
    cached.write_bytes(b"not a graph")
    third = create_encoder("efficientnet_lite0", pretrained=True).eval()
    with torch.no_grad():
        third(images)
        torch.testing.assert_close(third(images)[0], fast[0])
    assert cached.stat().st_size > 1000
    monkeypatch.setenv("CAPTIONER_ENCODER_RUNTIME", "torch")
    off = create_encoder("efficientnet_lite0", pretrained=True).eval()
    with torch.no_grad():
        off(images)
        off(images)
    assert off.__dict__["_ort"] is None and off.__dict__["_folded"] is not None
