"""The web page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Skips without /usr/bin/chromium unless CAPTIONER_REQUIRE_BROWSER=1 (as CI sets it), then fails.

Run as a script, it writes the documentation's screenshots with any model and folder of photos:
    python tests/test_browser.py --model CHECKPOINT --photos examples/ --query "a dog" --out docs/images
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # a busy 2-core machine: captioning through the page can take a few seconds


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed"
    return None


@contextlib.contextmanager
def chromium() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def build_index(db: Path, images: Path):
    """A PhotoIndex of the tiny data set's photos, each stored with the caption that describes it (the
    tiny model's own captions are too poor to search), through the search module's storing function."""
    from captioner.search import PhotoIndex

    index = PhotoIndex(db, create=True)
    for path in sorted(images.glob("*.jpg")):
        colour, shape, _ = path.stem.split("_")
        text = f"a {colour} {shape} on a white background"
        stat = path.stat()
        result = {"caption": text, "captions": [{"caption": text, "score": -1.0}]}
        index._store(str(path), stat.st_size, stat.st_mtime, result, str(images))
    return index


def canvas_pixels(page) -> str:
    return page.eval_on_selector("#canvas", "c => c.toDataURL()")


def caption_photo(page, url: str, photo: Path) -> None:
    page.goto(url)
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.getElementById('alt').value.length > 0", timeout=TIMEOUT_MS)


def search_photos(page, url: str, query: str) -> None:
    page.goto(url)
    page.wait_for_selector("#search-section:not([hidden])", timeout=TIMEOUT_MS)
    page.fill("#query", query)
    page.press("#query", "Enter")
    page.wait_for_selector("#hits img", timeout=TIMEOUT_MS)
    page.wait_for_function(
        "[...document.querySelectorAll('#hits img')].slice(0, 3).every(i => i.complete && i.naturalWidth)",
        timeout=TIMEOUT_MS,
    )


# --- tests ---

REQUIRED = os.environ.get("CAPTIONER_REQUIRE_BROWSER") == "1"
if __name__ != "__main__" and not REQUIRED and (MISSING := browser_missing()):
    # at module level, before pytest sets up (and trains) the session fixtures the tests would need
    pytest.skip(f"{MISSING}; set CAPTIONER_REQUIRE_BROWSER=1 to fail instead", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    if reason := browser_missing():
        pytest.fail(f"CAPTIONER_REQUIRE_BROWSER=1 but {reason}")
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def url(browser, tiny_model, tiny_data, tmp_path_factory):
    pytest.importorskip("captioner.search", reason="captioner.search is not there yet")
    from captioner.model import Captioner
    from captioner.server import create_app

    index = build_index(tmp_path_factory.mktemp("web") / "photos.sqlite", tiny_data / "images")
    with serve(create_app(Captioner.from_pretrained(tiny_model), index=index)) as address:
        yield address


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    page.close()


def test_upload_shows_caption_and_alt_text(page, url, tiny_data):
    caption_photo(page, url, tiny_data / "images" / "yellow_circle_0.jpg")
    alt = page.input_value("#alt")
    words = page.locator("#words button").all_inner_texts()
    assert alt and " ".join(words) == alt
    assert page.text_content("#status") == f"Caption: {alt}"  # announced in the aria-live region
    assert page.locator("#alternatives li").count() == 3
    assert not page.is_visible("#order")  # the tiny model carries no neighbours: the beam's own order
    labels = page.locator("#labels li").all_inner_texts()  # the encoder's labels, with probabilities
    assert labels and all(text.rstrip("%").split()[-1].isdigit() for text in labels)
    assert page.get_attribute("#alt", "readonly") is not None
    assert page.evaluate("document.getElementById('alt').tagName") == "TEXTAREA"  # long captions wrap
    assert page.locator("#canvas").bounding_box()["width"] > 100


def test_words_show_the_attention_heat_map(page, url, tiny_data):
    caption_photo(page, url, tiny_data / "images" / "blue_square_1.jpg")
    plain = canvas_pixels(page)
    first = page.locator("#words button").first
    first.focus()  # keyboard: focusing a word shows its map
    focused = canvas_pixels(page)
    assert focused != plain
    assert "looked for the word" in page.get_attribute("#canvas", "aria-label")
    first.click()  # clicking pins it: it stays when focus moves away
    assert first.get_attribute("aria-pressed") == "true"
    page.focus("#alt")
    assert canvas_pixels(page) == focused
    page.focus("#words button")
    page.keyboard.press("Escape")  # unpins; then blur shows the plain photo again
    page.focus("#alt")
    assert canvas_pixels(page) == plain


def test_a_bad_file_shows_why(page, url):
    page.goto(url)
    bad = Path(__file__).parent / "fixtures" / "images" / "truncated.jpg"
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('status').textContent.includes('truncated')")
    assert "truncated.jpg" in page.text_content("#status")


def test_the_api_docs_render_with_no_internet(page, url):
    page.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), lambda route: route.abort())  # offline
    page.goto(url + "/docs")
    page.wait_for_selector(".opblock")
    assert "/api/caption" in page.inner_text("body")


def test_search_finds_the_expected_photo_first(page, url):
    search_photos(page, url, "a green circle")
    first = page.locator("#hits figure").first
    assert first.locator(".path").inner_text().startswith("green_circle")  # relative to the folder
    assert "green circle" in first.locator("figcaption").inner_text()
    assert "found" in page.text_content("#search-status")
    search_photos(page, url, "a plate of spaghetti")  # nothing like it: the nearest, said to be no match
    assert page.locator("#hits figure").count() > 0
    assert page.text_content("#search-status").startswith('No good match for "a plate of spaghetti"')


@pytest.fixture(scope="module")
def url_with_embedding(browser, tiny_model, tiny_embedding, tiny_data, tmp_path_factory):
    """A server whose index (captioned by the tiny model) has a search embedding: "More like this"."""
    from captioner.model import Captioner
    from captioner.search import PhotoIndex, attach_embedding
    from captioner.search.joint import JointEmbedding
    from captioner.server import create_app

    captioner = Captioner.from_pretrained(tiny_model)
    index = PhotoIndex(tmp_path_factory.mktemp("web-joint") / "photos.sqlite", create=True)
    joint = JointEmbedding.from_pretrained(tiny_embedding)
    index.update(tiny_data / "images", captioner, progress=False, joint=joint, joint_name=str(tiny_embedding))
    assert attach_embedding(index)
    with serve(create_app(captioner, index=index)) as address:
        yield address
    index.close()


def test_more_like_this_shows_the_photos_nearest_a_hit(page, url, url_with_embedding):
    search_photos(page, url, "a green circle")
    assert page.locator("#hits .more").count() == 0  # no embedding in that index: no button

    search_photos(page, url_with_embedding, "a green circle")
    first = page.locator("#hits figure").first
    clicked = first.locator(".path").inner_text().split(" · ")[0]
    first.locator(".more").click()
    page.wait_for_function(
        "document.getElementById('search-status').textContent.includes('photos like')", timeout=TIMEOUT_MS
    )
    paths = [p.split(" · ")[0] for p in page.locator("#hits .path").all_inner_texts()]
    assert len(paths) == 12 and clicked not in paths and clicked in page.text_content("#search-status")


# --- screenshots for the documentation ---


def screenshots(model: str, photos: Path, query: str, out: Path, *, photo: str | None, word: int = 1) -> None:
    """Caption one photo (a word's heat map pinned), search an index of its folder; save both pages."""
    from captioner.model import Captioner
    from captioner.search import PhotoIndex
    from captioner.server import create_app

    captioner = Captioner.from_pretrained(model)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        index = PhotoIndex(Path(tmp) / "photos.sqlite", create=True)
        index.update(photos, captioner, progress=False)
        first = photos / photo if photo else sorted(photos.glob("*.jpg"))[0]
        with serve(create_app(captioner, index=index, model_name=Path(model).name)) as url, chromium() as b:
            page = b.new_page(viewport={"width": 960, "height": 700})
            page.set_default_timeout(TIMEOUT_MS)
            caption_photo(page, url, first)
            page.locator("#words button").nth(word).click()
            page.mouse.move(0, 0)
            page.screenshot(path=str(out / "web-caption.png"), type="png", full_page=True)
            search_photos(page, url, query)
            page.screenshot(path=str(out / "web-search.png"), type="png", full_page=True)
        index.close()
    for name in ("web-caption.png", "web-search.png"):
        shrink(out / name)
        print(f"{out / name}: {(out / name).stat().st_size / 1024:.0f} KB")


def shrink(png: Path) -> None:
    """256 colours, dithered: a third of the size, and the photos still look like photos."""
    from PIL import Image

    with Image.open(png) as img:
        small = img.convert("RGB").quantize(256, dither=Image.Dither.FLOYDSTEINBERG)
    small.save(png, optimize=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the web page's screenshots for the docs.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--photos", type=Path, default=Path("examples"))
    parser.add_argument("--photo", default=None, help="the file in --photos to caption (default: the first)")
    parser.add_argument("--query", default="a dog")
    parser.add_argument("--word", type=int, default=1, help="which caption word's heat map to show")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    a = parser.parse_args()
    if reason := browser_missing():
        sys.exit(f"cannot take screenshots: {reason}")
    screenshots(a.model, a.photos, a.query, a.out, photo=a.photo, word=a.word)
