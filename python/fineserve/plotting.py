"""The matplotlib pieces every figure shares: a headless figure, saving it (to a file with
a one-line error, or to PNG bytes), and an empirical CDF drawn with no more points than
pixels."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import FineserveError

#: A CDF needs no more points than a panel has pixels.
CDF_POINTS = 4000


def figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    """A figure on the Agg backend (no display needed); ``ax`` is always 2-D."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def save(fig: Any, path: Path) -> Path:
    """Writes ``fig`` as a PNG and closes it."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=90)
    except OSError as e:
        raise FineserveError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
    return Path(path)


def png_bytes(fig: Any) -> bytes:
    """``fig`` as PNG bytes, closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=90)
    finally:
        plt.close(fig)
    return buf.getvalue()


def cdf(ax: Any, values: npt.NDArray[Any], **style: Any) -> None:
    """The empirical CDF of the positive ``values`` (nothing for none)."""
    v = np.sort(values[values > 0])
    if not len(v):
        return
    y = np.arange(1, len(v) + 1) / len(v)
    step = max(1, len(v) // CDF_POINTS)
    ax.plot(v[::step], y[::step], **style)


def legend(ax: Any, fontsize: float = 7) -> None:
    """A legend of the labelled artists, or "no data" when nothing was drawn (a run whose
    requests all failed)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
