"""Small PNG line plots drawn with PIL (matplotlib is not a dependency).

:func:`line_plot` draws several series over a shared x axis: axes, "nice" ticks with labels (decades on a log
axis), optional log x (for σ), markers, a legend to the right, a title. Non-finite values break a line; values
outside ``ylim`` are clipped to the frame (drawn on its edge).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

__all__ = ["line_plot", "PALETTE", "nice_ticks", "log_ticks"]

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


_ASCII = {"σ": "sigma", "²": "^2", "³": "^3", "ε": "eps", "λ": "lambda", "μ": "mu", "x̂": "x^", "≈": "~",
          "−": "-", "→": "->"}


def _font(size: int):
    """(font, unicode_ok): DejaVu Sans when the system has it (σ, ², x̂ render), else Pillow's default font."""
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size), True
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size), False
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default(), False


def _text(s: str, unicode_ok: bool) -> str:
    if unicode_ok:
        return s
    for a, b in _ASCII.items():
        s = s.replace(a, b)
    return s.encode("ascii", "replace").decode()


def nice_ticks(lo: float, hi: float, target: int = 6) -> list:
    """Round tick values (1, 2, 2.5, 5 × 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(1, target - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def log_ticks(lo: float, hi: float) -> Tuple[list, list]:
    """(major, minor) tick values for a log axis over [lo, hi] (lo > 0): decades, plus 2 and 5 when few."""
    a, b = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    decades = [10.0 ** k for k in range(a, b + 1)]
    major = [v for v in decades if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
    minor = [m * v for v in decades for m in range(2, 10) if lo <= m * v <= hi]
    if len(major) < 3:  # short span: label 2 and 5 too
        extra = [v for v in minor if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5)]
        major = sorted(major + extra)
        minor = [v for v in minor if v not in extra]
    return major, minor


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        m, e = f"{v:.0e}".split("e")
        return f"{m}e{int(e)}"
    return f"{v:.4g}"


def line_plot(path, x: Sequence[float], series: Dict[str, Sequence[float]], *, xlabel: str = "",
              ylabel: str = "", title: str = "", logx: bool = True, logy: bool = False,
              ylim: Optional[Tuple[Optional[float], Optional[float]]] = None,
              size: Tuple[int, int] = (760, 440), markers: bool = True) -> None:
    """Write a PNG line plot: one line per entry of ``series`` (name -> values, same length as ``x``).

    logx / logy: log10 axes (non-positive values are dropped from that axis). ylim: (lo, hi), either may be None
    for the data's own bound; points outside are drawn clipped to the frame.
    """
    x = [float(v) for v in x]
    if not series:
        raise ValueError("line_plot: no series to draw")
    for name, ys in series.items():
        if len(ys) != len(x):
            raise ValueError(f"line_plot: series {name!r} has {len(ys)} values for {len(x)} x values")
    W, H = size
    (font, uni), (small, _) = _font(13), _font(11)
    xlabel, ylabel, title = (_text(t, uni) for t in (xlabel, ylabel, title))
    series = {_text(str(k), uni): v for k, v in series.items()}
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)

    def tw(text, f):
        b = d.textbbox((0, 0), text, font=f)
        return b[2] - b[0], b[3] - b[1]

    legend_w = max(tw(n, small)[0] for n in series) + 40
    left, right, top, bottom = 70, W - legend_w - 16, 34, H - 50

    def ok(v, log):
        return v is not None and math.isfinite(v) and (v > 0 or not log)

    xs = [v for v in x if ok(v, logx)]
    ys_all = [float(v) for ys in series.values() for v in ys if v is not None and ok(float(v), logy)]
    if not xs or not ys_all:
        raise ValueError("line_plot: no finite values to draw")
    tx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    ty = (lambda v: math.log10(v)) if logy else (lambda v: v)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys_all), max(ys_all)
    if ylim is not None:
        y0 = y0 if ylim[0] is None else float(ylim[0])
        y1 = y1 if ylim[1] is None else float(ylim[1])
    if x1 == x0:
        x0, x1 = (x0 / 2, x0 * 2) if logx else (x0 - 1, x1 + 1)
    if y1 <= y0:
        y0, y1 = (y0 / 2, y0 * 2) if logy else (y0 - 0.5, y0 + 0.5)
    if not logy:  # a little head room
        pad = 0.04 * (y1 - y0)
        y0, y1 = (y0 if ylim and ylim[0] is not None else y0 - pad), (y1 if ylim and ylim[1] is not None else y1 + pad)
    X0, X1, Y0, Y1 = tx(x0), tx(x1), ty(y0), ty(y1)

    def px(v):
        return left + (tx(v) - X0) / (X1 - X0) * (right - left)

    def py(v):
        t = (ty(v) - Y0) / (Y1 - Y0)
        return bottom - min(1.0, max(0.0, t)) * (bottom - top)

    grid, axis, ink = (228, 228, 228), (60, 60, 60), (20, 20, 20)
    # ticks and grid
    if logx:
        xmaj, xmin_ = log_ticks(x0, x1)
    else:
        xmaj, xmin_ = [v for v in nice_ticks(x0, x1) if x0 <= v <= x1], []
    for v in xmin_:
        d.line([(px(v), top), (px(v), bottom)], fill=(242, 242, 242))
    for v in xmaj:
        p = px(v)
        d.line([(p, top), (p, bottom)], fill=grid)
        d.line([(p, bottom), (p, bottom + 4)], fill=axis)
        w, _ = tw(_fmt(v), small)
        d.text((p - w / 2, bottom + 6), _fmt(v), fill=ink, font=small)
    if logy:
        ymaj, _ = log_ticks(y0, y1)
    else:
        ymaj = [v for v in nice_ticks(y0, y1) if y0 - 1e-12 <= v <= y1 + 1e-12]
    for v in ymaj:
        p = py(v)
        d.line([(left, p), (right, p)], fill=grid)
        d.line([(left - 4, p), (left, p)], fill=axis)
        w, h = tw(_fmt(v), small)
        d.text((left - 7 - w, p - h / 2 - 2), _fmt(v), fill=ink, font=small)
    d.rectangle([left, top, right, bottom], outline=axis)
    # labels
    if title:
        w, _ = tw(title, font)
        d.text(((left + right) / 2 - w / 2, 8), title, fill=ink, font=font)
    if xlabel:
        w, _ = tw(xlabel, font)
        d.text(((left + right) / 2 - w / 2, H - 24), xlabel + (" (log scale)" if logx else ""), fill=ink,
               font=font)
    if ylabel:
        w, h = tw(ylabel, font)
        lab = Image.new("RGB", (w + 4, h + 8), (255, 255, 255))
        ImageDraw.Draw(lab).text((2, 0), ylabel, fill=ink, font=font)
        lab = lab.rotate(90, expand=True)
        img.paste(lab, (6, int((top + bottom) / 2 - lab.height / 2)))
    # series
    for k, (name, ys) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        seg = []
        pts = []
        for xv, yv in zip(x, ys):
            yv = None if yv is None else float(yv)
            if ok(xv, logx) and yv is not None and ok(yv, logy):
                seg.append((px(xv), py(yv)))
                pts.append(seg[-1])
            else:
                if len(seg) > 1:
                    d.line(seg, fill=color, width=2)
                seg = []
        if len(seg) > 1:
            d.line(seg, fill=color, width=2)
        if markers:
            for (a, b) in pts:
                d.ellipse([a - 2.5, b - 2.5, a + 2.5, b + 2.5], fill=color)
        # legend entry
        ly = top + 6 + 18 * k
        lx = right + 14
        d.line([(lx, ly + 7), (lx + 22, ly + 7)], fill=color, width=3)
        d.text((lx + 28, ly), name, fill=ink, font=small)
    img.save(path)
