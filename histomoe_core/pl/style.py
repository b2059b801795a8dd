"""One place for the size of figures: they are drawn for the book's text column.

The book shows a figure scaled to the text column (688 CSS px at a 1280 px window, images have ``max-width:
100%``). A figure ``w`` inches wide renders ``w * DPI`` px, so it shows at ``688 / (w * DPI)`` of its size; at
``MAX_WIDTH_IN`` it still shows at >= 70 %, with 10 pt text about 10 px high. :func:`subplots` is
``plt.subplots`` with the figure size capped at that width (height scaled with it) and the dpi fixed, and
:func:`max_columns` says how many panels of a given size fit side by side.
"""
from __future__ import annotations

import matplotlib.pyplot as plt

#: dots per inch of every figure (inline backend and savefig: ``savefig.dpi`` is "figure" by default)
DPI = 100
#: CSS px of the book's text column at a 1280 px window
COLUMN_PX = 688
#: the smallest display scale a figure should have in the book
MIN_SCALE = 0.7
#: widest natural width in px of a figure image (legends drawn outside the axes included)
MAX_PX = int(COLUMN_PX / MIN_SCALE)  # 982
#: widest figure, inches (a little under MAX_PX / DPI: bbox_inches="tight" can add a legend or label)
MAX_WIDTH_IN = 9.2
#: the smallest text, points: ticks, legends, panel captions (>= 8 px on screen at the smallest scale)
SMALL_PT = 8


def fit(width: float, height: float, max_width: float = MAX_WIDTH_IN) -> tuple[float, float]:
    """``(width, height)`` scaled down together so the width is at most ``max_width`` inches."""
    if width <= max_width:
        return float(width), float(height)
    f = max_width / width
    return max_width, float(height) * f


def max_columns(panel_in: float, extra_in: float = 0.0, max_width: float = MAX_WIDTH_IN) -> int:
    """How many panels ``panel_in`` inches wide fit side by side (``extra_in`` for a colour bar or legend)."""
    return max(1, int((max_width - extra_in) // panel_in))


def text_colour(rgba) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba`` (relative luminance, WCAG)."""
    import numpy as np

    c = np.asarray(rgba, float)[:3]
    lin = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lum = float(lin @ [0.2126, 0.7152, 0.0722])
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6.4, 4.0), **kwargs):
    """``plt.subplots`` with ``figsize`` capped by :func:`fit` and the book's :data:`DPI`."""
    kwargs.setdefault("dpi", DPI)
    return plt.subplots(nrows, ncols, figsize=fit(*figsize), **kwargs)
