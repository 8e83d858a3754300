"""PNG plots and labelled figures, drawn with matplotlib's Agg renderer.

Every function builds its own :class:`matplotlib.figure.Figure` on a :class:`FigureCanvasAgg`, so nothing here
touches pyplot's global state or the user's chosen backend (plotting from a notebook or a GUI session is safe).
Callers pass plain numbers and arrays; ``size`` is the PNG's size in pixels at ``dpi``.

- :func:`line_plot`: several series over a shared x axis (log σ by default), legend, labels, title.
- :func:`loss_plot`: a training-loss curve with its moving average, log y.
- :func:`calibration_plot`: the chosen patch size per σ beside the per-step metric of every candidate.
- :func:`labelled_rows`: rows of image tiles with a text label on the left of each (pixel-exact tiles).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

if TYPE_CHECKING:
    from matplotlib.axis import Axis

__all__ = ["calibration_plot", "labelled_rows", "line_plot", "loss_plot"]


def _check_size(size: Sequence[int], dpi: float) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise TypeError(f"size: expected (width, height) in pixels, got {size!r}") from None
    if w < 64 or h < 64:
        raise ValueError(f"size: expected at least 64 x 64 pixels, got {size!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not dpi > 0:
        raise ValueError(f"dpi: expected a number > 0, got {dpi!r}")
    return w, h


def _figure(size: Sequence[int], dpi: float) -> Figure:
    w, h = _check_size(size, dpi)
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
    # No bbox_inches="tight": the PNG keeps exactly the requested pixel size.
    fig.savefig(os.fspath(path), dpi=fig.dpi, format="png", facecolor="white")


def _log_ticks(axis: Axis, lims: Sequence[float]) -> None:
    """Readable ticks on a log axis whose view is ``lims``: matplotlib's decades when it spans two or more,
    else plain numbers at 1-2-5 (or every digit) per decade, so a short span still gets several labels and the
    minor labels of a narrow panel do not collide."""
    lo, hi = sorted(float(v) for v in lims)
    axis.set_minor_formatter(NullFormatter())
    if not (lo > 0 and math.isfinite(hi)):
        return
    decades = math.log10(hi / lo)
    if decades < 2:
        axis.set_major_locator(
            LogLocator(base=10.0, subs=(1.0, 2.0, 5.0) if decades >= 0.7 else tuple(float(k) for k in range(1, 10)))
        )
        axis.set_major_formatter(FuncFormatter(lambda t, _: f"{t:.3g}"))


def _floats(name: str, values: Iterable[float | None], n: int | None = None) -> np.ndarray:
    """1-D float64 array; None and ±inf become NaN (a gap in the line)."""
    try:
        vals = list(values)
        arr = np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of numbers (None for a gap), got {values!r:.80}") from None
    if n is not None and arr.size != n:
        raise ValueError(f"{name}: has {arr.size} values for {n} x values")
    arr[~np.isfinite(arr)] = np.nan
    return arr


def line_plot(
    path: str | os.PathLike[str],
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    logx: bool = True,
    logy: bool = False,
    ylim: tuple[float | None, float | None] | None = None,
    size: tuple[int, int] = (960, 600),
    dpi: float = 120,
    markers: bool = True,
) -> None:
    """Write a PNG line plot: one line per entry of ``series`` (name -> values, same length as ``x``).

    Non-finite values and None break a line; on a log axis (``logx`` / ``logy``) non-positive values are left
    out too. ``ylim``: (lo, hi), either may be None for the data's own bound; values outside are drawn clipped
    onto the frame's edge (so "r² clipped at −1" shows where the points are). Raises ValueError when there is
    nothing to draw.
    """
    if not isinstance(series, Mapping) or not series:
        raise ValueError("series: expected a non-empty dict {name: values}")
    xs = _floats("x", x)
    if xs.size == 0:
        raise ValueError("x: expected at least one value")
    if logx:
        xs[xs <= 0] = np.nan
    try:
        lo, hi = (None, None) if ylim is None else (None if v is None else float(v) for v in ylim)
    except (TypeError, ValueError):
        raise TypeError(f"ylim: expected (lo, hi), each a number or None, got {ylim!r}") from None
    if any(v is not None and math.isnan(v) for v in (lo, hi)):
        raise ValueError(f"ylim: expected numbers or None, got {ylim!r}")
    if logy and lo is not None and not lo > 0:
        raise ValueError(f"ylim: a log y axis needs a lower bound > 0, got {lo!r}")
    if lo is not None and hi is not None:
        if lo > hi:
            raise ValueError(f"ylim: expected lo <= hi, got {ylim!r}")
        if lo == hi:  # e.g. every r² is exactly 1: centre the line in a unit-wide (log: ×4) window
            lo, hi = (lo / 2, hi * 2) if logy else (lo - 0.5, hi + 0.5)
    ys = {}
    for name, vals in series.items():
        y = _floats(f"series {name!r}", vals, xs.size)
        if logy:
            y[y <= 0] = np.nan
        with np.errstate(invalid="ignore"):
            y = np.clip(y, -np.inf if lo is None else lo, np.inf if hi is None else hi)
        y[np.isnan(xs)] = np.nan
        ys[str(name)] = y
    if not any(np.isfinite(y).any() for y in ys.values()):
        raise ValueError(
            "line_plot: no finite values to draw" + (" (log axes drop values <= 0)" if logx or logy else "")
        )

    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    for name, y in ys.items():
        ax.plot(xs, y, marker="o" if markers else None, markersize=3.5, linewidth=1.8, label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if lo is not None or hi is not None:
        ax.set_ylim(bottom=lo, top=hi)
    if logx:  # after the limits: the ticks depend on the span in view
        _log_ticks(ax.xaxis, ax.get_xlim())
    if logy:
        _log_ticks(ax.yaxis, ax.get_ylim())
    ax.grid(True, which="major", alpha=0.35)
    if logx or logy:
        ax.grid(True, which="minor", alpha=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    _save(fig, path)


def loss_plot(
    path: str | os.PathLike[str],
    losses: Sequence[float],
    *,
    title: str = "training loss",
    size: tuple[int, int] = (960, 540),
    dpi: float = 120,
) -> float | None:
    """Write a training-loss PNG: every step's loss in grey, a trailing moving average (window ~n/50) in blue,
    log y. Non-finite or non-positive losses are gaps (a diverged run still gets a picture, with a note when no
    loss is drawable). Returns the moving average at the last step (None if it is undefined)."""
    vals = _floats("losses", losses)
    if vals.size == 0:
        raise ValueError("losses: expected at least one value")
    vals[vals <= 0] = np.nan
    steps = np.arange(1, vals.size + 1)
    k = max(1, vals.size // 50)
    ok = np.isfinite(vals)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, vals, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    start = np.maximum(0, steps - k)
    count = ccount[steps] - ccount[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        smooth = np.where(count > 0, (csum[steps] - csum[start]) / np.maximum(count, 1), np.nan)
    last = float(smooth[-1]) if math.isfinite(smooth[-1]) else None

    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    if ok.any():
        ax.plot(steps, vals, color="0.7", linewidth=0.9, label="loss per step")
        ax.plot(steps, smooth, color="tab:blue", linewidth=2.0, label=f"mean of the last {k}")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
        ax.legend(loc="upper right", fontsize="small")
        ax.set_xlim(0.5, vals.size + 0.5)
        _log_ticks(ax.yaxis, ax.get_ylim())
    else:
        ax.text(0.5, 0.5, "no finite, positive loss to draw", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title + ("" if last is None else f" (last-{k} mean at the end: {last:.4g})"))
    _save(fig, path)
    return last


def calibration_plot(
    path: str | os.PathLike[str],
    sigmas: Sequence[float],
    candidate_sizes: Sequence[int],
    chosen: Sequence[int],
    picks: Sequence[Sequence[int]],
    values: Sequence[Sequence[float]],
    *,
    higher_is_better: bool = True,
    metric: str = "metric",
    title: str = "",
    size: tuple[int, int] = (1200, 500),
    dpi: float = 110,
) -> None:
    """Write a two-panel PNG for a patch-size calibration.

    Left: the chosen k against σ (log axis, red line) and every seed's pick (blue dots, area = how many seeds).
    Right: ``values`` (steps × candidates: the metric of each candidate k at each step, rows in the order of
    ``sigmas``), scaled per row to [0, 1] with 1 = best, the chosen k framed in red.
    """
    sig = _floats("sigmas", sigmas)
    if sig.size == 0 or not (np.isfinite(sig) & (sig > 0)).all():
        raise ValueError(f"sigmas: expected finite values > 0, got {list(sigmas)!r}")
    sizes = [int(k) for k in candidate_sizes]
    if not sizes:
        raise ValueError("candidate_sizes: expected at least one size")
    chosen = [int(k) for k in chosen]
    if len(chosen) != sig.size or len(picks) != sig.size:
        raise ValueError(f"chosen and picks: expected one entry per σ ({sig.size}), got {len(chosen)} and {len(picks)}")
    vals = np.asarray(values, dtype=np.float64)
    if vals.shape != (sig.size, len(sizes)):
        raise ValueError(
            f"values: expected shape ({sig.size}, {len(sizes)}) (steps × candidate sizes), got {vals.shape}"
        )
    bad = [k for k in chosen if k not in sizes]
    if bad:
        raise ValueError(f"chosen: sizes {bad} are not among candidate_sizes {sizes}")

    fig = _figure(size, dpi)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1.0]})
    # Left: k vs σ.
    px, py, pn = [], [], []
    for s, ks in zip(sig, picks):
        for k in sorted({int(v) for v in ks}):
            px.append(s)
            py.append(k)
            pn.append(sum(int(v) == k for v in ks))
    if px:
        left.scatter(
            px,
            py,
            s=18 * np.asarray(pn, dtype=float),
            color="tab:blue",
            alpha=0.45,
            label="a seed's best k (area = seeds)",
        )
    order = np.argsort(sig)
    left.plot(
        sig[order],
        np.asarray(chosen)[order],
        color="tab:red",
        marker="o",
        linewidth=2,
        markersize=4,
        label="chosen k (median over seeds)",
    )
    left.set_xscale("log")
    _log_ticks(left.xaxis, left.get_xlim())
    left.set_yticks(sizes)
    left.set_ylim(min(sizes) - 1, max(sizes) + 1)
    left.set_xlabel("σ")
    left.set_ylabel("patch size k")
    left.grid(True, alpha=0.3)
    left.legend(loc="best", fontsize="small")
    left.set_title("patch size vs σ")
    # Right: per-row scaled metric (bright = better).
    v = np.where(np.isfinite(vals), vals if higher_is_better else -vals, np.nan)
    scaled = np.full_like(v, np.nan)
    for r, row in enumerate(v):  # a row without any finite value stays blank
        if np.isfinite(row).any():
            lo, hi = np.nanmin(row), np.nanmax(row)
            scaled[r] = (row - lo) / (hi - lo) if hi > lo else np.where(np.isfinite(row), 1.0, np.nan)
    im = right.imshow(scaled, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    for r, k in enumerate(chosen):
        c = sizes.index(k)
        right.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="tab:red", linewidth=2))
    right.set_xticks(range(len(sizes)))
    right.set_xticklabels([str(k) for k in sizes])
    every = max(1, math.ceil(sig.size / 12))  # at most ~12 σ labels
    rows = list(range(0, sig.size, every))
    right.set_yticks(rows)
    right.set_yticklabels([f"{sig[r]:.3g}" for r in rows])
    right.set_xlabel("candidate patch size k")
    right.set_ylabel("σ at the step")
    right.set_title(f"{metric} per k, scaled per step (1 = best; red = chosen)")
    fig.colorbar(im, ax=right, fraction=0.05, pad=0.02)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def labelled_rows(
    path: str | os.PathLike[str],
    rows: Sequence[tuple[str, np.ndarray]],
    *,
    gap: int = 4,
    fontsize: float = 11,
    dpi: float = 100,
) -> tuple[int, int]:
    """Write a PNG of image rows, each with its (possibly multi-line) label on the left. ``rows``: (label,
    (H, W, 3) uint8 image) pairs, e.g. viz.images.tile strips. The images are placed pixel for pixel (no
    resampling); matplotlib only draws the labels (its bundled DejaVu Sans renders σ, λ, x̂ on any system).
    Returns the PNG's (width, height)."""
    rows = [(str(label), np.asarray(img)) for label, img in rows]
    if not rows:
        raise ValueError("rows: expected at least one (label, image) pair")
    for label, img in rows:
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(
                f"rows: the image of {label!r} must be a non-empty (H, W, 3) uint8 array, got {img.dtype} {img.shape}"
            )
    # Measure the labels on a scratch canvas first: the figure's size depends on the widest one.
    probe = Figure(dpi=dpi)
    renderer = FigureCanvasAgg(probe).get_renderer()
    label_w = max(probe.text(0, 0, label, fontsize=fontsize).get_window_extent(renderer).width for label, _ in rows)
    label_w = math.ceil(label_w) + 16
    width = label_w + max(img.shape[1] for _, img in rows)
    height = sum(img.shape[0] for _, img in rows) + gap * (len(rows) - 1)
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    y = height  # figimage and fig.text count pixels from the bottom
    for label, img in rows:
        y -= img.shape[0]
        fig.figimage(img, xo=label_w, yo=y, origin="upper")
        fig.text(8 / width, (y + img.shape[0] / 2) / height, label, fontsize=fontsize, ha="left", va="center")
        y -= gap
    _save(fig, path)
    return width, height
