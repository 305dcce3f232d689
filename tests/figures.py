"""Checks of written plots, shared by the tests of every command that draws one (the figures themselves are
captured by conftest.py's `saved_figures` fixture and inspected by each test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def check_png(path: Path, figure, dpi: int = 110) -> None:
    """The file is a PNG of the figure's size in pixels (± 1) and not blank (more than 20 distinct colours)."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    width, height = figure.get_size_inches() * dpi
    assert image.ndim == 3 and abs(image.shape[0] - height) <= 1 and abs(image.shape[1] - width) <= 1
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20
