"""Patches of an open slide read tile-wise at the pyramid level that fits the patch's output resolution.

A patch is ``spec.size_um`` wide at the spot; at level 0 that is ``spec.crop_px(um_per_px)`` pixels. The level
read is the coarsest one whose downsample does not exceed ``crop_px / out_px`` (no upsampling of a coarse level),
and the crops are resized there to ``out_px`` as on every other route (:func:`~histomoe_core.data.patches.
resize_patches`). A batch of neighbouring spots (a grid in raster order) is read as one region when that region
is not much larger than its patches, else patch by patch; memory stays at a few regions whatever the slide size.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from histomoe_core.cache import code_fingerprint, content_key
from histomoe_core.data.patches import PatchSpec, crop_boxes, resize_patches
from histomoe_core.data.sample import Sample
from histomoe_core.slide.reader import SlideImage, level_for

#: read a batch as one region when it is at most this many times the patches' own area
REGION_SLACK = 3.0


class SlidePatches:
    """A :class:`~histomoe_core.embed.PatchReader` over one open slide (used for every sample on it)."""

    def __init__(self, slide: SlideImage) -> None:
        self.slide = slide

    def cache_id(self) -> str:
        return content_key("slide-patches", self.slide.backend, list(self.slide.downsamples),
                           code_fingerprint("histomoe_core.slide.patches", "histomoe_core.slide.reader"))

    def level(self, crop_px: int, out_px: int) -> int:
        return level_for(self.slide, crop_px / out_px)

    def batches(self, sample: Sample, spec: PatchSpec, *, batch_size: int,
                indices: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        crop = spec.crop_px(sample.pixel_size_um)
        boxes = crop_boxes(sample.coords, crop)
        level = self.level(crop, spec.out_px)
        for start in range(0, len(indices), batch_size):
            idx = np.asarray(indices[start : start + batch_size])
            yield idx, self.read_patches(boxes[idx], level, spec.out_px)

    def read_patches(self, boxes: np.ndarray, level: int, out_px: int) -> np.ndarray:
        """(B, out_px, out_px, 3) uint8 patches of level-0 ``boxes`` read at ``level``."""
        x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
        x1, y1 = boxes[:, 2].max(), boxes[:, 3].max()
        own = float(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum())
        if (x1 - x0) * (y1 - y0) <= REGION_SLACK * own:
            d = self.slide.downsamples[level]
            region = self.slide.read(int(x0), int(y0), int(x1 - x0), int(y1 - y0), level)
            return resize_patches([_cut(region, b, x0, y0, d) for b in boxes], out_px)
        return resize_patches([self.slide.read(int(b[0]), int(b[1]), int(b[2] - b[0]), int(b[3] - b[1]), level)
                               for b in boxes], out_px)


def _cut(region: np.ndarray, box: np.ndarray, x0: int, y0: int, d: float) -> np.ndarray:
    a, b = int(round((box[0] - x0) / d)), int(round((box[1] - y0) / d))
    side = max(1, int(round((box[2] - box[0]) / d)))
    return region[b : b + side, a : a + side]

