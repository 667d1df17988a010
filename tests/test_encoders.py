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
