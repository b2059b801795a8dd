"""Open a slide image of any common kind behind one small interface, reading regions at a chosen level.

- Whole-slide formats (SVS, NDPI, MRXS, SCN, ...): OpenSlide (``openslide-python`` + ``openslide-bin``).
- TIFF, pyramidal or not: tifffile (codecs from imagecodecs: JPEG, LZW, JPEG 2000, ...), each level read as a
  zarr array so only the tiles a region touches are decoded; a scanner's TIFF (Aperio, Philips, Ventana) goes
  to OpenSlide.
- JPEG / PNG / other single images: Pillow (decoded once; such images fit in memory by nature).

Pixel size (um / px at level 0) comes from the file when it says so: OpenSlide's ``openslide.mpp-x``, OME-XML
``PhysicalSizeX``, or TIFF resolution tags in centimetres or inches. JPEG / PNG DPI headers are not trusted (they
are almost always a screen default); then ``um_per_px`` must be given, and nothing is guessed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from histomoe_core.errors import DataError

Image.MAX_IMAGE_PIXELS = None
#: suffixes OpenSlide reads that tifffile does not understand as plain TIFF pyramids
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf")


class SlideImage(Protocol):
    path: Path
    backend: str
    size: tuple[int, int]  #: (width, height) at level 0
    downsamples: tuple[float, ...]  #: per level, level 0 first
    um_per_px: float | None  #: from the file's metadata, None when it does not say

    def read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """RGB uint8 of the level-0 box ``(x, y, w, h)`` read at ``level`` (white outside the slide)."""

    def close(self) -> None: ...


def level_for(slide: SlideImage, downsample: float) -> int:
    """The coarsest level whose downsample is at most ``downsample`` (never upsample a level to a patch)."""
    ok = [i for i, d in enumerate(slide.downsamples) if d <= downsample * (1 + 1e-6)]
    return max(ok, key=lambda i: slide.downsamples[i]) if ok else 0


def _white_pad(arr: np.ndarray, x: int, y: int, w: int, h: int, d: float, size: tuple[int, int]) -> np.ndarray:
    """Place the in-slide part ``arr`` (read from the clipped box) into a white canvas of the full box."""
    ow, oh = max(1, int(round(w / d))), max(1, int(round(h / d)))
    if arr.shape[:2] == (oh, ow):
        return arr
    out = np.full((oh, ow, 3), 255, np.uint8)
    ox, oy = int(round((max(x, 0) - x) / d)), int(round((max(y, 0) - y) / d))
    a = arr[: oh - oy, : ow - ox]
    out[oy : oy + a.shape[0], ox : ox + a.shape[1]] = a
    return out


def _clip(x: int, y: int, w: int, h: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, size[0]), min(y + h, size[1])
    return x0, y0, x1, y1


def _rgb(a: np.ndarray) -> np.ndarray:
    """RGB uint8 from grey, RGBA (composited on white glass) or 16-bit pixels."""
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    if a.dtype != np.uint8:
        raise DataError(f"slide pixels are {a.dtype}; only 8- or 16-bit RGB / grey slides are supported")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = (a[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


@dataclass
class PILSlide:
    """A single-resolution image decoded once with Pillow."""

    path: Path
    image: Image.Image
    um_per_px: float | None = None
    backend: str = "pillow"

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        x0, y0, x1, y1 = _clip(x, y, w, h, self.size)
        if x1 <= x0 or y1 <= y0:
            return np.full((h, w, 3), 255, np.uint8)
        return _white_pad(np.asarray(self.image.crop((x0, y0, x1, y1))), x, y, w, h, 1.0, self.size)

    def close(self) -> None:
        self.image.close()


class TiffSlide:
    """A TIFF (pyramidal or not) read level by level through tifffile's zarr store (tiles on demand)."""

    backend = "tifffile"

    def __init__(self, path: Path, tf) -> None:
        import zarr

        self.path, self._tf = path, tf
        series = tf.series[0]
        self._levels = [lvl for lvl in series.levels]
        store = tf.series[0].aszarr()
        group = zarr.open(store, mode="r")
        self._arrays = [group] if not hasattr(group, "keys") else [group[k] for k in sorted(group.keys(), key=int)]
        self._axes = series.axes
        h0, w0 = self._hw(self._levels[0].shape)
        self.size = (int(w0), int(h0))
        self.downsamples = tuple(w0 / self._hw(lvl.shape)[1] for lvl in self._levels)
        self.um_per_px = tiff_um_per_px(tf)

    def _hw(self, shape) -> tuple[int, int]:
        return shape[self._axes.index("Y")], shape[self._axes.index("X")]

    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        d = self.downsamples[level]
        x0, y0, x1, y1 = _clip(x, y, w, h, self.size)
        if x1 <= x0 or y1 <= y0:
            return np.full((max(1, int(round(h / d))), max(1, int(round(w / d))), 3), 255, np.uint8)
        sl = []
        for ax in self._axes:
            sl.append(slice(int(y0 / d), max(int(y0 / d) + 1, int(round(y1 / d)))) if ax == "Y" else
                      slice(int(x0 / d), max(int(x0 / d) + 1, int(round(x1 / d)))) if ax == "X" else
                      slice(None) if ax in "SC" else 0)
        a = np.asarray(self._arrays[level][tuple(sl)])
        if "S" not in self._axes and "C" in self._axes:
            a = np.moveaxis(a, 0, -1)
        return _white_pad(_rgb(a), x, y, w, h, d, self.size)

    def close(self) -> None:
        self._tf.close()


class OpenSlideSlide:
    """A whole-slide image read with OpenSlide."""

    backend = "openslide"

    def __init__(self, path: Path, osr) -> None:
        import openslide

        self.path, self._osr = path, osr
        self.size = tuple(int(v) for v in osr.dimensions)
        self.downsamples = tuple(float(d) for d in osr.level_downsamples)
        mpp = osr.properties.get(openslide.PROPERTY_NAME_MPP_X)
        self.um_per_px = float(mpp) if mpp not in (None, "", "0") else None

    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        d = self.downsamples[level]
        size = (max(1, int(round(w / d))), max(1, int(round(h / d))))
        return _rgb(np.asarray(self._osr.read_region((int(x), int(y)), level, size)))

    def close(self) -> None:
        self._osr.close()


def tiff_um_per_px(tf) -> float | None:
    """um / px of a TIFF's first page from OME-XML or its resolution tags; None when it does not say."""
    if tf.is_ome and tf.ome_metadata:
        import re

        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
        if m and (unit is None or unit.group(1) in ("µm", "um", "\u00b5m")):
            return float(m.group(1))
    page = tf.pages[0]
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit = num / den if den else 0.0
        if per_unit > 0 and unit in (2, 3):  # 2: inch, 3: centimetre (1: none)
            um = (25400.0 if unit == 2 else 10000.0) / per_unit
            if unit == 2 and abs(per_unit - round(per_unit)) < 1e-9 and round(per_unit) in (72, 96, 300):
                return None  # a screen / print default, not a scanner's pixel size
            return um
    return None


def _vendor(path: Path) -> str | None:
    """OpenSlide's name for the file's format (None: not a slide OpenSlide reads)."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        return None


def open_slide_image(path: Path, *, um_per_px: float | None = None) -> SlideImage:
    """Open ``path`` with the fitting backend; ``um_per_px`` overrides the file's own pixel size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"slide {path} does not exist; pass the path of a JPEG, PNG, TIFF or whole-slide image")
    if um_per_px is not None and not (np.isfinite(um_per_px) and um_per_px > 0):
        raise DataError(f"--um-per-px must be a positive number of micrometres per pixel, got {um_per_px}")
    slide = _open(path)
    if um_per_px is not None:
        slide.um_per_px = float(um_per_px)
    if slide.um_per_px is None:
        slide.close()
        raise DataError(f"{path.name}: the file does not record its pixel size; pass --um-per-px (e.g. 0.5 for a "
                        "20x scan); it is never guessed")
    return slide


def _open(path: Path) -> SlideImage:
    name = path.name.lower()
    tiff = name.endswith(TIFF_SUFFIXES)
    if name.endswith(OPENSLIDE_SUFFIXES) or (tiff and _vendor(path) not in (None, "generic-tiff")):
        import openslide

        try:
            return OpenSlideSlide(path, openslide.OpenSlide(str(path)))
        except (openslide.OpenSlideError, OSError) as e:
            raise DataError(f"{path}: OpenSlide cannot read it ({e}); is the file complete?") from e
    if tiff:
        import tifffile

        try:
            return TiffSlide(path, tifffile.TiffFile(path))
        except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as e:
            raise DataError(f"{path} is not a readable TIFF ({e}); pass a JPEG, PNG, TIFF or whole-slide image") from e
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path} is not an image ({type(e).__name__}); pass a JPEG, PNG, TIFF or whole-slide "
                        "image (SVS, NDPI, ...)") from e
    return PILSlide(path, im if im.mode == "RGB" else im.convert("RGB"))


#: a level larger than this (pixels) is read for the thumbnail in strips
STRIP_PIXELS = 32_000_000


def thumbnail(slide: SlideImage, *, max_px: int = 2048) -> tuple[np.ndarray, float]:
    """``(RGB uint8 image, downsample)``: the slide at most ``max_px`` wide or high, from the coarsest level that
    is at least that large, read in strips when that level is big (never a whole large level in memory)."""
    w, h = slide.size
    d = max(w, h) / max_px if max(w, h) > max_px else 1.0
    level = level_for(slide, d)
    dl = slide.downsamples[level]
    tw, th = max(1, int(round(w / d))), max(1, int(round(h / d)))
    step = h if (w / dl) * (h / dl) <= STRIP_PIXELS else max(int(d), int(STRIP_PIXELS / (w / dl) * dl))
    rows = []
    for y in range(0, h, step):
        y1 = min(y + step, h)
        out_h = int(round(y1 / d)) - int(round(y / d))
        if out_h <= 0:
            continue
        strip = slide.read(0, y, w, y1 - y, level)
        rows.append(np.asarray(Image.fromarray(strip).resize((tw, out_h), Image.BILINEAR))
                    if strip.shape[:2] != (out_h, tw) else strip)
    img = np.concatenate(rows) if len(rows) > 1 else rows[0]
    return img[:th], w / img.shape[1]
