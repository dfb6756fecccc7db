"""Safe image loading and the vision encoders' preprocessing.

- Paths resolve inside an image root: absolute paths and ``..`` escapes are refused.
- The pixel count, the aspect ratio and the size of every intermediate canvas the resize policy
  makes are checked from the header before decoding (decompression bombs; a 40000 x 400 image is
  a 40000 x 40000 canvas once padded to a square).
- Decoding errors (truncated, empty, not an image) become ``BadSample`` with a reason.
- RGB conversion composites alpha over a background colour.
- Resize policies: ``crop`` (shortest side, centre crop: CLIP), ``pad`` (pad to square with the
  mean colour, then resize: LLaVA-1.5), ``squash`` (resize to S x S: mPLUG-Owl).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from modalign.config import VisionConfig
from modalign.data.conversation import BadSample

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_ASPECT = 32.0  # longest side / shortest side
Image.MAX_IMAGE_PIXELS = None  # modalign checks the size itself, before decoding
# the formats decoded: each gives its size from its header before any pixel is decoded (ICO and
# ICNS decode an embedded image of any size while opening or loading, past the size check)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@functools.cache
def _decoders() -> tuple[str, ...]:
    """``IMAGE_FORMATS`` this Pillow can open (a build without WebP lacks it)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def resolve_image_path(root: str | Path, rel: str, sample_id: str | None = None) -> Path:
    """``rel`` inside ``root``; refuses absolute paths and escapes through ``..`` or links."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise BadSample("bad image path", f"image path {rel!r:.80} is not a non-empty string without NUL bytes",
                        sample_id)  # fmt: skip
    p = Path(rel)
    if p.is_absolute():
        raise BadSample("bad image path", f"absolute image path {rel!r} is not allowed", sample_id)
    root = Path(root).resolve()
    full = (root / p).resolve()
    if full != root and root not in full.parents:
        raise BadSample("bad image path", f"image path {rel!r} escapes the image root {root}", sample_id)
    return full


def check_size(w: int, h: int, name: str, sample_id: str | None, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect: float = DEFAULT_MAX_ASPECT, canvas=None) -> None:  # fmt: skip
    """Refuse an image from its header size: no pixels, over ``max_pixels``, an aspect ratio over
    ``max_aspect``, or (``canvas(w, h)``: the pixels of the largest intermediate image the resize
    policy makes) a canvas over twice ``max_pixels``."""
    if w <= 0 or h <= 0:
        raise BadSample("corrupt image", f"image {name} has no pixels", sample_id)
    if w * h > max_pixels:
        raise BadSample("image too large", f"image {name} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}",
                        sample_id)  # fmt: skip
    if max(w, h) / min(w, h) > max_aspect:
        raise BadSample("image too large", f"image {name} is {w}x{h}: an aspect ratio over the limit of "
                        f"{max_aspect:g}", sample_id)  # fmt: skip
    if canvas is not None and canvas(w, h) > 2 * max_pixels:
        raise BadSample("image too large", f"image {name} ({w}x{h}) needs a {canvas(w, h)}-pixel canvas to "
                        f"resize, over the limit of {2 * max_pixels}", sample_id)  # fmt: skip


def open_image(
    src: str | Path | bytes | Image.Image,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
    sample_id: str | None = None,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    canvas=None,
) -> Image.Image:
    """Decode to an RGB ``PIL.Image``; every failure is a ``BadSample`` naming the file. The size
    is checked (``check_size``) from the header, before any pixel is decoded."""
    name = "<bytes>" if isinstance(src, bytes) else "<image>" if isinstance(src, Image.Image) else str(src)
    if isinstance(src, Image.Image):
        check_size(*src.size, name, sample_id, max_pixels, max_aspect, canvas)
        return to_rgb(src, background)
    try:
        fh = io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise BadSample("missing image", f"image file {name} does not exist", sample_id) from None
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise BadSample("missing image", f"image file {name!r} cannot be opened: {e}", sample_id) from None
    with fh:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = Image.open(fh, formats=_decoders())
                check_size(*img.size, name, sample_id, max_pixels, max_aspect, canvas)
                img.load()
                check_size(*img.size, name, sample_id, max_pixels, max_aspect, canvas)  # as decoded
            return to_rgb(img, background)
        except BadSample:
            raise
        except (MemoryError, OverflowError) as e:
            raise BadSample("image too large", f"image {name}: out of memory decoding it ({e.__class__.__name__})",
                            sample_id) from None  # fmt: skip
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            kind = ("empty file" if fh.seek(0, 2) == 0 else
                    f"not an image in a supported format ({', '.join(_decoders())})"
                    if isinstance(e, UnidentifiedImageError) else "corrupt or not an image")  # fmt: skip
            raise BadSample(
                "corrupt image", f"image {name}: {kind} ({e.__class__.__name__}: {e})", sample_id
            ) from None


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def canvas_pixels(w: int, h: int, size: int, mode: str) -> int:
    """Pixels of the largest intermediate image ``resize`` makes for a ``w`` x ``h`` image."""
    if mode == "pad":
        return max(w, h) ** 2
    if mode == "crop":
        scale = size / min(w, h)
        return max(size, int(w * scale)) * max(size, int(h * scale))
    return size * size


def resize(img: Image.Image, size: int, mode: str, mean: tuple[float, ...]) -> Image.Image:
    if mode == "pad":
        w, h = img.size
        if w != h:
            s = max(w, h)
            canvas = Image.new("RGB", (s, s), tuple(int(m * 255) for m in mean))
            canvas.paste(img, ((s - w) // 2, (s - h) // 2))
            img = canvas
        return img.resize((size, size), Image.BICUBIC)
    if mode == "squash":
        return img.resize((size, size), Image.BICUBIC)
    if mode == "crop":
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, int(w * scale)), max(size, int(h * scale))  # truncation, as CLIP does
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    raise ValueError(f"unknown resize mode {mode!r}; known: pad, crop, squash")


# coarse places of a point in a 3x3 grid, row-major (ShapesWorld's cell names, region phrases)
GRID_PLACES = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)


def grid_place(x: float, y: float) -> str:
    """The coarse place of the normalised point (x, y): "top left" ... "center" ... "bottom right"."""
    return GRID_PLACES[min(int(y * 3), 2) * 3 + min(int(x * 3), 2)]


def patch_at(x: float, y: float, size: tuple[int, int], vcfg: VisionConfig) -> int | None:
    """The patch (row-major index in the ``image_size / patch_size`` grid) that the normalised
    point (x, y) of an image of ``size`` (w, h) lands in after ``resize``; None if cropped away."""
    w, h = size
    mode = vcfg.resize_mode
    if mode == "pad":
        s = max(w, h)
        x, y = (x * w + (s - w) // 2) / s, (y * h + (s - h) // 2) / s
    elif mode == "crop":
        t = vcfg.image_size
        scale = t / min(w, h)
        nw, nh = max(t, int(w * scale)), max(t, int(h * scale))
        x, y = (x * nw - (nw - t) // 2) / t, (y * nh - (nh - t) // 2) / t
    elif mode != "squash":
        raise ValueError(f"unknown resize mode {mode!r}; known: pad, crop, squash")
    if not (0 <= x < 1 and 0 <= y < 1):
        return None
    g = vcfg.image_size // vcfg.patch_size
    return int(y * g) * g + int(x * g)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 tensor [3, H, W], contiguous: each channel's plane in one block, so the
    normalisation (``ImageProcessor._normalise``, run on every use of a cached image) reads and
    writes memory in order (5x faster than on the decoder's interleaved layout)."""
    return torch.from_numpy(np.ascontiguousarray(np.array(img, dtype=np.uint8).transpose(2, 0, 1)))


class ImageProcessor:
    """The vision encoder's preprocessing: safe load -> RGB -> resize policy -> normalise.

    With ``cache_mb`` > 0, images keep their resized uint8 pixels in memory (least recently used
    first out, at most ``cache_mb`` MiB): files keyed by path, modification time and size (data with
    one question per sample decodes each image once per epoch instead of once per question), images
    given as bytes by a digest of the bytes (a server asked about one picture again and again). The
    output is the same tensor either way. The cache is safe to share between threads."""

    def __init__(self, vcfg: VisionConfig, max_pixels: int = DEFAULT_MAX_PIXELS, background=(255, 255, 255),
                 cache_mb: float = 0, max_aspect: float = DEFAULT_MAX_ASPECT):  # fmt: skip
        self.cfg, self.max_pixels, self.background, self.max_aspect = vcfg, max_pixels, background, max_aspect
        self._mean = np.array(vcfg.image_mean, dtype=np.float32)[:, None, None]
        self._std = np.array(vcfg.image_std, dtype=np.float32)[:, None, None]
        if not cache_mb >= 0:
            raise ValueError(f"the decoded-image cache size must be >= 0 MiB, got {cache_mb}")
        self.cache_limit = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, tuple[int, int]]] = OrderedDict()
        self.cache_bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self):  # data-loader workers get a copy: a lock does not pickle
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, src, sample_id: str | None = None) -> torch.Tensor:
        return self.load(src, sample_id)[0]

    def load(self, src, sample_id: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """(pixels, the original (width, height))."""
        key = self._cache_key(src)
        hit = None
        if key is not None:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
        if hit is not None:
            u8, size = hit
        else:
            c = self.cfg
            img = open_image(src, self.max_pixels, self.background, sample_id, self.max_aspect, self._canvas)
            try:
                u8 = self._hd(img) if c.hd_layout == "ixc" else to_uint8(resize(img, c.image_size, c.resize_mode,
                                                                                  c.image_mean))  # fmt: skip
            except (MemoryError, OverflowError) as e:
                raise BadSample("image too large", f"image of {img.size[0]}x{img.size[1]}: out of memory resizing "
                                f"it ({e.__class__.__name__})", sample_id) from None  # fmt: skip
            size = img.size
            if key is not None:
                self._remember(key, u8, size)
        return self._normalise(u8), size

    def _normalise(self, u8: torch.Tensor) -> torch.Tensor:
        """(x / 255 - mean) / std in float32, in NumPy: the same values as torch's ops (each a
        correctly rounded float32 operation; ``test_normalise_matches_torch`` checks all 768),
        and never a parallel torch op, whose OpenMP threads would stay with the calling thread
        (a server's request threads: ``devices.in_own_thread`` says why that slows decoding).
        The layout of ``u8`` is kept."""
        x = u8.numpy().astype(np.float32, order="K")
        x /= np.float32(255.0)
        x -= self._mean
        x /= self._std
        return torch.from_numpy(x)

    def _canvas(self, w: int, h: int) -> int:
        c = self.cfg
        if c.hd_layout == "ixc":  # at most 6 tiles of image_size, the image resized into them
            return 6 * c.image_size**2
        return canvas_pixels(w, h, c.image_size, c.resize_mode)

    def _cache_key(self, src) -> tuple | None:
        if not self.cache_limit:
            return None
        if isinstance(src, bytes | bytearray | memoryview):
            return "bytes", len(src), hashlib.blake2b(src, digest_size=16).digest()
        if not isinstance(src, str | Path):
            return None
        try:
            st = os.stat(src)
        except OSError:
            return None  # open_image reports it
        return str(src), st.st_mtime_ns, st.st_size

    def _remember(self, key: tuple, u8: torch.Tensor, size: tuple[int, int]) -> None:
        n = u8.numel()
        if n > self.cache_limit:
            return
        with self._lock:
            if key in self._cache:  # another thread decoded the same image meanwhile
                return
            while self.cache_bytes + n > self.cache_limit:
                _, (old, _) = self._cache.popitem(last=False)
                self.cache_bytes -= old.numel()
            self._cache[key] = (u8, size)
            self.cache_bytes += n

    def _hd(self, img: Image.Image, max_tiles: int = 6) -> torch.Tensor:
        """XComposer2.5: fit into at most ``max_tiles`` tiles (width-major), pad bottom white;
        uint8 [3, H, W]."""
        t = self.cfg.image_size
        w, h = img.size
        transposed = h > w
        if transposed:
            img, (w, h) = img.transpose(Image.TRANSPOSE), (h, w)
        aspect = w / h
        scale = 1
        while (scale + 1) * -(-(scale + 1) // aspect) <= max_tiles:
            scale += 1
        scale = min(scale, max(1, -(-w // t)))
        nw, nh = scale * t, max(1, round(scale * t / aspect))
        img = img.resize((nw, nh), Image.BICUBIC)
        ph = -(-nh // t) * t
        canvas = Image.new("RGB", (nw, ph), (255, 255, 255))
        canvas.paste(img, (0, 0))
        if transposed:
            canvas = canvas.transpose(Image.TRANSPOSE)
        return to_uint8(canvas)
