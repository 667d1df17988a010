"""What the Python API takes as an image: paths, URLs, bytes, file objects, PIL images, numpy arrays."""

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.errors import ImageError
from captioner.images import load_image
from captioner.model import Captioner

EXAMPLE = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def model():
    return Captioner.from_pretrained()


@pytest.fixture
def served(tmp_path):
    """A folder served over http on localhost (no internet needed): yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_every_kind_of_image_gives_the_same_caption(model, served):
    folder, url = served
    png = folder / "cat.png"  # PNG: no reduced-scale decoding, so every kind holds the same pixels
    with Image.open(EXAMPLE / "cat.jpg") as img:
        img.convert("RGB").resize((400, 300)).save(png)
    pixels = np.asarray(Image.open(png).convert("RGB"))
    kinds = {
        "path": png,
        "str": str(png),
        "url": f"{url}/cat.png",
        "bytes": png.read_bytes(),
        "file": open(png, "rb"),  # noqa: SIM115  (closed below)
        "pil": Image.open(png),
        "array": pixels,
        "float array": pixels.astype(np.float32) / 255.0,
    }
    results = {k: model.caption(v, beam_size=3) for k, v in kinds.items()}
    kinds["file"].close()
    want = results["path"]
    for kind, got in results.items():
        assert (got.caption, round(got.score, 4)) == (want.caption, round(want.score, 4)), kind
    as_list = model.caption([png, pixels, kinds["pil"]], beam_size=3)  # a list: one Caption each
    assert [c.caption for c in as_list] == [want.caption] * 3
    assert model.caption(Image.open(EXAMPLE / "cat.jpg")).caption  # a JPEG as PIL decoded in full: fine


def test_a_pil_image_is_turned_upright_and_left_unchanged(tmp_path):
    photo = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = photo.getexif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees
    photo.save(tmp_path / "sideways.jpg", exif=exif)
    given = Image.open(tmp_path / "sideways.jpg")
    assert load_image(given).size == (20, 40)
    assert given.size == (40, 20) and given.getexif().get(0x0112) == 6


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (np.zeros((3, 32, 32), np.uint8), r"<array>: .*not \(3, 32, 32\) \(channels first\?"),
        (np.zeros((4, 4, 5), np.uint8), r"H x W x 3 \(RGB\)"),
        (np.full((8, 8, 3), 2.0, np.float32), "float array image must hold values from 0 to 1"),
        (np.full((8, 8), 300, np.int32), "from 0 to 255"),
        (12, "cannot read an image from a int"),
        (
            "http://127.0.0.1:9/cat.jpg",
            r"http://127.0.0.1:9/cat.jpg: cannot download .*is this machine online\?",
        ),
    ],
)
def test_what_cannot_be_an_image_says_what_is_wrong(model, source, message):
    with pytest.raises(ImageError, match=message):
        model.caption(source)


def test_a_missing_url_names_the_http_error(model, served):
    _, url = served
    with pytest.raises(ImageError, match=r"/nothing.jpg: download failed \(HTTP 404"):
        model.caption(f"{url}/nothing.jpg")


def test_an_image_file_opened_as_text_is_refused_plainly(model):
    with open(EXAMPLE / "cat.jpg", encoding="latin-1") as text, pytest.raises(ImageError, match="'rb' mode"):
        model.caption(text)
