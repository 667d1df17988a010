"""The one image pipeline shared by training, feature extraction, inference and the web server.

Every code path that turns a file into encoder input goes through ``load_image`` and
``build_transform`` with the same ``Preprocess`` (saved in checkpoints and feature caches), so
preprocessing cannot drift between training and inference -- the classic cause of a captioner
that says the same sentence for every image.

``load_image`` needs only Pillow; torch and torchvision are imported lazily by the tensor helpers.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Union, cast

from PIL import Image, ImageOps

from captioner.errors import ConfigError, ImageError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torchvision.transforms import Compose

MAX_IMAGE_PIXELS: int = 64_000_000
"""Decompression-bomb limit in pixels. Pillow's own limit (``Image.MAX_IMAGE_PIXELS``) also applies."""

IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "HEIF", "AVIF")
"""Formats Pillow may try (JPEG includes phone MPO files; HEIF is iPhone's HEIC, read by pillow-heif;
AVIF is Pillow's own from 11.3). Allow-listed so an upload cannot reach exotic decoders (e.g. EPS runs
Ghostscript)."""

# ISO base media "ftyp" brands: what a HEIC or AVIF file says it is in its first bytes
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_AVIF_BRANDS = (b"avif", b"avis")


@functools.cache
def readable_formats() -> frozenset[str]:
    """Register the optional decoders once (pillow-heif for HEIC; pillow-avif-plugin on a Pillow without
    AVIF); returns the formats that can be read."""
    formats = set(IMAGE_FORMATS) - {"HEIF", "AVIF"}
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        formats.add("HEIF")
    except ImportError:
        pass
    from PIL import features

    if "avif" in features.get_supported_modules() and features.check("avif"):
        formats.add("AVIF")
    else:
        try:
            import pillow_avif  # type: ignore[import-not-found]  # noqa: F401  (registers itself)

            formats.add("AVIF")
        except ImportError:
            pass
    return frozenset(formats)


def _unreadable_kind(data: bytes) -> str | None:
    """'HEIC' or 'AVIF' when the bytes are one that no installed plugin reads, else None."""
    if data[4:8] != b"ftyp":
        return None
    brand = data[8:12]
    if brand in _HEIF_BRANDS and "HEIF" not in readable_formats():
        return "HEIC"
    if brand in _AVIF_BRANDS and "AVIF" not in readable_formats():
        return "AVIF"
    return None


_HIGH_BIT_DEPTH = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, "np.ndarray"]
"""What ``load_image`` takes: a path, the file's bytes, a binary file object, a PIL image or a numpy array."""


def load_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    min_side: int | None = None,
) -> Image.Image:
    """Open, validate and normalise one image to 8-bit RGB, upright.

    The pixels are decoded here, in full, so a broken file fails now with a per-file ImageError
    rather than later inside a DataLoader worker. ``name`` labels errors (default: the path, or
    ``<bytes>`` / the stream's name). The returned image is a loaded copy; no file stays open.

    ``min_side``: the caller needs only this many pixels on each side, so a JPEG is decoded at 1/2, 1/4 or
    1/8 scale (Pillow's ``draft``: the decoder skips the rest of the DCT) as long as both sides stay at
    least this long. A 12-megapixel photo then costs a fraction of its full decode, in time and memory.

    A PIL image or a numpy array (H x W grey, H x W x 3 RGB or H x W x 4 RGBA; uint8, or floats from 0 to
    1) has been decoded already: it is used as it is (EXIF orientation applied to a PIL image), so the
    same JPEG given by path can differ from it by the reduced-scale decoding.
    """
    if isinstance(source, Image.Image):
        return _from_pil(source, name or "<PIL image>", max_pixels)
    if hasattr(source, "__array_interface__") or type(source).__module__ == "numpy":
        return _from_pil(
            _from_array(cast("np.ndarray", source), name or "<array>"), name or "<array>", max_pixels
        )
    label, data = _read(source, name)
    if not data:
        raise ImageError(label, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=sorted(readable_formats())) as img:
                _check_pixels(img, label, max_pixels)  # the size is in the header: before decoding anything
                if min_side is not None and img.format == "JPEG":
                    img.draft("RGB", (min_side, min_side))  # keeps both sides >= min_side
                img.load()
                upright = _upright(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(label, f"image is too large, possible decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        if kind := _unreadable_kind(data):
            package = "pillow-heif" if kind == "HEIC" else "pillow-avif-plugin"
            raise ImageError(
                label, f"a {kind} image, which needs `pip install {package}` to be read"
            ) from None
        formats = ", ".join(sorted(readable_formats()))
        raise ImageError(label, f"not a recognised image file (supported formats: {formats})") from None
    except Exception as e:  # Pillow's decoders raise many types on bad data; all mean "unusable file"
        if "truncated" in str(e):
            raise ImageError(label, "file is truncated (the image data ends early)") from e
        raise ImageError(label, f"corrupt image data ({type(e).__name__}: {e})") from e
    return _to_rgb(upright, label)


def _check_pixels(img: Image.Image, label: str, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            label, f"image is too large ({width}x{height} pixels, limit is {max_pixels:,} pixels)"
        )


def _from_pil(img: Image.Image, label: str, max_pixels: int) -> Image.Image:
    _check_pixels(img, label, max_pixels)
    try:
        img.load()  # an image from Image.open() is read only now
    except Exception as e:
        raise ImageError(label, f"corrupt image data ({type(e).__name__}: {e})") from e
    return _to_rgb(_upright(img), label)  # a copy: the caller's image is not changed


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    import numpy as np

    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise ImageError(
            label,
            f"an array image must be H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA), not {a.shape}"
            + (
                " (channels first? use array.transpose(1, 2, 0))"
                if a.ndim == 3 and a.shape[0] in (3, 4)
                else ""
            ),
        )
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ImageError(label, "a float array image must hold values from 0 to 1")
        a = (a * 255.0).round().astype(np.uint8)
    elif a.dtype.kind in "iu" and a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise ImageError(
                label, f"an integer array image must hold values from 0 to 255 ({a.dtype} given)"
            )
        a = a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(label, f"an array image must hold uint8 or floats from 0 to 1, not {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))


MAX_FILE_BYTES = MAX_DOWNLOAD = 64 * 1024 * 1024  # bytes: no photo is larger


def download(url: str, timeout: float = 30.0) -> bytes:
    """The bytes at an http(s) URL, or an ImageError that says why not (a machine without the internet
    gets that said plainly). For the Python API; nothing that serves requests fetches URLs."""
    import urllib.error
    import urllib.request

    from captioner import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"captioner/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_DOWNLOAD + 1)
    except urllib.error.HTTPError as e:
        raise ImageError(url, f"download failed (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise ImageError(url, f"cannot download ({reason}); is this machine online?") from None
    if len(data) > MAX_DOWNLOAD:
        raise ImageError(url, f"download is larger than {MAX_DOWNLOAD // 2**20} MB")
    return data


def _read(source: str | os.PathLike | bytes | BinaryIO, name: str | None) -> tuple[str, bytes]:
    """Return (label for errors, whole file contents); reading it all up front means nothing stays open."""
    if isinstance(source, bytes | bytearray | memoryview):
        return name or "<bytes>", bytes(source)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        label = name or str(path)
        try:
            # opened without blocking and checked before reading: a FIFO would wait for a writer forever,
            # /dev/zero would fill the memory
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if stat.S_ISDIR(st.st_mode):
                    raise ImageError(label, "is a directory, not an image file")
                if not stat.S_ISREG(st.st_mode):
                    raise ImageError(label, "not a regular file (a pipe, a device or a socket)")
                if st.st_size > MAX_FILE_BYTES:
                    raise ImageError(
                        label, f"file is too large ({st.st_size:,} bytes; the limit is {MAX_FILE_BYTES:,})"
                    )
                return label, f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            raise ImageError(label, "file not found") from None
        except IsADirectoryError:
            raise ImageError(label, "is a directory, not an image file") from None
        except OSError as e:
            raise ImageError(label, f"cannot read file ({e.strerror or e})") from None
    read = getattr(source, "read", None)
    if not callable(read):
        raise ImageError(
            name or f"<{type(source).__name__}>",
            f"cannot read an image from a {type(source).__name__} (give a path, an http(s) URL, bytes, a "
            "binary file object, a PIL image or a numpy array)",
        )
    label = name or str(getattr(source, "name", "<stream>"))
    data = read()
    if isinstance(data, str):
        raise ImageError(label, "a text stream: open the file in 'rb' mode")
    return label, data


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation so phone photos come out the right way up (always returns a copy)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a mangled EXIF block should not cost us an otherwise good picture
        return img.copy()


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white, like a web page shows it."""
    if img.mode in _HIGH_BIT_DEPTH:
        img = _stretch_to_8bit(img)
    if img.mode in _WITH_ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    try:
        return img.convert("RGB")
    except ValueError:
        raise ImageError(label, f"unsupported colour mode {img.mode!r}") from None


def _stretch_to_8bit(img: Image.Image) -> Image.Image:
    """Map 16/32-bit or float grey onto 0..255 using the image's own min..max.

    Clipping turns most 16-bit images white and dividing by 257 turns narrow-range scans black;
    stretching shows what is actually there. A constant image keeps its value, clipped to 0..255.
    """
    grey = img.convert("F")
    lo, hi = cast(tuple[float, float], grey.getextrema())  # one band: (min, max)
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    offset = -lo * scale if hi > lo else 0.0
    return grey.point(lambda v: v * scale + offset + 0.5).convert("L")  # +0.5: F->L truncates


@dataclass(frozen=True)
class Preprocess:
    """How an encoder wants its input. Saved in every checkpoint and feature cache so that
    training and inference agree."""

    size: int = 224  # square side fed to the encoder
    resize: str = "squash"  # "squash": size x size ignoring aspect; "crop": short side to size, centre crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"  # "bilinear" or "bicubic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ConfigError(f"Preprocess.size must be a positive int, got {self.size!r}")
        if self.resize not in ("squash", "crop"):
            raise ConfigError(f"Preprocess.resize must be 'squash' or 'crop', got {self.resize!r}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ConfigError(
                f"Preprocess.interpolation must be 'bilinear' or 'bicubic', not {self.interpolation!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"Preprocess needs 3 means and 3 positive stds, got {self.mean} and {self.std}")

    def to_dict(self) -> dict:
        """Plain JSON/YAML-safe dict (lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Inverse of to_dict. Unknown keys are an error: they mean a checkpoint from a different version."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown Preprocess keys: {', '.join(map(str, unknown))}")
        return cls(**d)


DRAFT_FACTOR = 2
"""JPEGs are decoded at no less than this multiple of the encoder's input side, so the antialiased resize
still has real pixels to average (at 1x, decoding's own box filter would do the whole reduction)."""


def loader_workers() -> int:
    """DataLoader processes that read and decode files while the model works: two where there are cores
    to spare; on two cores none, the decoding being done by threads of the model's own process (faster
    there for 224 px and 12-megapixel photos alike: benchmarks/run.py's loader sweep)."""
    return 2 if (os.cpu_count() or 1) > 2 else 0


def decode_side(pre: Preprocess) -> int:
    """The ``min_side`` that ``load_image`` needs for this preprocessing (every pipeline path uses it)."""
    return DRAFT_FACTOR * pre.size


class _RandomSubCrop:
    """Crop a random 80-100% of the area at nearly the image's own aspect ratio, without resampling.

    torchvision's RandomResizedCrop takes an absolute aspect-ratio range, which on a wide photo cuts a
    square out of it -- not the view "squash" shows at eval time. Cropping first and then applying the
    eval resize keeps training views close to eval views in both resize modes.
    """

    def __init__(self, scale: tuple[float, float] = (0.8, 1.0), ratio: tuple[float, float] = (0.9, 1.1)):
        self.scale, self.ratio = scale, ratio

    def __call__(self, img: Image.Image) -> Image.Image:
        import torch  # the torch RNG is what DataLoader seeds per worker

        width, height = img.size
        area = torch.empty(()).uniform_(*self.scale).item()
        ratio = math.exp(torch.empty(()).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1])).item())
        crop_w = min(width, max(1, round(width * math.sqrt(area * ratio))))
        crop_h = min(height, max(1, round(height * math.sqrt(area / ratio))))
        left = int(torch.randint(0, width - crop_w + 1, ()).item())
        top = int(torch.randint(0, height - crop_h + 1, ()).item())
        return img.crop((left, top, left + crop_w, top + crop_h))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, ratio={self.ratio})"


def build_transform(pre: Preprocess, *, train: bool = False) -> Compose:
    """torchvision pipeline: PIL RGB -> normalised float tensor [3, size, size].

    train=True adds light augmentation suited to captioning: a mild random crop and a small
    brightness/contrast/saturation jitter. No horizontal flip (captions say "left" and "right")
    and no hue jitter (captions name colours).
    """
    from torchvision import transforms as T

    interp = T.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    if pre.resize == "squash":
        resize = [T.Resize((pre.size, pre.size), interpolation=interp, antialias=True)]
    else:
        resize = [T.Resize(pre.size, interpolation=interp, antialias=True), T.CenterCrop(pre.size)]
    steps = [_RandomSubCrop(), *resize, T.ColorJitter(0.1, 0.1, 0.1)] if train else resize
    return T.Compose([*steps, T.ToTensor(), T.Normalize(pre.mean, pre.std)])


@functools.lru_cache(maxsize=8)
def _eval_transform(pre: Preprocess) -> Compose:
    return build_transform(pre, train=False)


def image_tensor(source: ImageSource, pre: Preprocess, *, name: str | None = None) -> torch.Tensor:
    """load_image + the eval transform: exactly the [3, size, size] tensor an encoder sees for this image."""
    return _eval_transform(pre)(load_image(source, name=name, min_side=decode_side(pre)))


# --- many files: batches that go on past a bad file ---


class ImageFiles:
    """A map-style dataset of (row, tensor) for paths[row]; a file that cannot be used yields
    (row, error message) instead, so one bad image never fails a batch or a DataLoader worker."""

    def __init__(self, paths: Sequence[str | os.PathLike], rows: Sequence[int], pre: Preprocess):
        self.paths, self.rows, self.transform = paths, rows, build_transform(pre)
        self.min_side = decode_side(pre)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        row = self.rows[i]
        try:
            return row, self.transform(load_image(self.paths[row], min_side=self.min_side))
        except ImageError as e:
            return row, str(e)


@dataclass
class ImageBatch:
    rows: list[int]  # every row of the batch, in order
    good: list[int]  # the rows whose image loaded, in order
    images: torch.Tensor | None  # their tensors [len(good), 3, S, S]; None when none loaded
    errors: dict[int, str]  # row -> 'PATH: what is wrong'


def load_batches(
    paths: Sequence[str | os.PathLike],
    pre: Preprocess,
    *,
    rows: Sequence[int] | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
) -> Iterator[ImageBatch]:
    """Read and preprocess `paths` (or only `rows` of them) in batches, ahead of the caller's work on the
    previous batch: what feature extraction, captioning and evaluation all run. `num_workers`: DataLoader
    processes (default: `loader_workers`); with none, `LOADER_THREADS` threads of this process decode."""
    import torch

    rows = range(len(paths)) if rows is None else rows
    if num_workers is None:
        num_workers = loader_workers()
    if batch_size == 1:  # one image a batch: a second process costs more in hand-offs than it saves
        num_workers = min(num_workers, 1)
    files = ImageFiles(paths, rows, pre)
    if num_workers > 0 and len(rows) > batch_size:  # a process costs more than one batch
        from torch.utils.data import DataLoader

        batches: Iterator[list] = iter(
            DataLoader(files, batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list)  # type: ignore[arg-type]
        )
    else:
        batches = _threaded(files, batch_size, LOADER_THREADS)
    for items in batches:
        good = [(r, x) for r, x in items if isinstance(x, torch.Tensor)]
        yield ImageBatch(
            [r for r, _ in items],
            [r for r, _ in good],
            torch.stack([x for _, x in good]) if good else None,
            {r: x for r, x in items if isinstance(x, str)},
        )


LOADER_THREADS = 2
"""Threads that decode ahead of the model in its own process. Pillow and torch let go of the GIL while
they decode, resize and normalise, so the next batch is read while the model works on this one, without
a loader process's start-up and hand-offs (benchmarks/run.py's loader sweep)."""


def _threaded(files: ImageFiles, batch_size: int, threads: int) -> Iterator[list]:
    """The items of `files` in batches, in order, decoded by a pool of `threads` up to two batches ahead
    (no further: a library of 100,000 photos is never all in memory)."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads, thread_name_prefix="captioner-load")
    todo = iter(range(len(files)))
    pending: deque[Future] = deque(
        pool.submit(files.__getitem__, i) for i in itertools.islice(todo, 2 * batch_size)
    )
    try:
        while pending:
            batch: list = []
            while pending and len(batch) < batch_size:
                batch.append(pending.popleft().result())
                following = next(todo, None)  # one taken, one queued: the window stays two batches
                if following is not None:
                    pending.append(pool.submit(files.__getitem__, following))
            yield batch
    finally:  # the caller stopped early, or a batch failed: drop what is queued
        pool.shutdown(wait=True, cancel_futures=True)


def _as_list(items: list) -> list:
    """DataLoader collate that keeps a batch as a list, so good images and errors can be told apart."""
    return items
