"""Side-by-side timings of the global retrieval: PyTorch baselines vs the engine's backends, with roofline floors.

Every configuration is timed in one process on one device, so ratios are meaningful; each timed path is also
checked against the float64 oracle on a few rows (column ``rel_err``), so a fast wrong answer shows.
Data: random uint8 keys (N, D) with the [-1, 1] affine map, resident on the device; queries are training rows
plus noise of scale σ (the regime a sampler visits).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from typing import Any, Callable, cast

import torch

from ..ops import KeyBank, softmax_retrieval, torch_backend
from ..ops.retrieval import choose_backend
from . import baselines, roofline

BASELINES = ("naive", "chunked", "sdpa")
ENGINE = ("torch", "cpu", "triton", "cuda")
PATHS = BASELINES + ENGINE
ORACLE_ROWS = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (which also pays one-off compile costs).

    On a GPU each call is timed with CUDA events on the current stream after a write of a buffer larger than the
    L2 cache (so a key set that fits in L2 is read from HBM again, as in a sampler that touches other data between
    calls); on the CPU with ``time.perf_counter``.
    """
    fn()
    _sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    flush = _l2_flush_buffer(device)
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A byte buffer of twice the device's L2 size (at least 64 MiB): writing it evicts whatever L2 held."""
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
    return torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=device)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _path_memory(path: str, n: int, d: int, b: int) -> int:
    """Bytes a path needs beyond the uint8 keys (float rows for the baselines, B×N temporaries for naive)."""
    if path in ("naive",):
        return 4 * n * d + 16 * b * n
    if path in ("chunked", "sdpa"):
        return 4 * n * (d + 1) * (2 if path == "sdpa" else 1) + 16 * b * 8192
    return 64 * b * d + 4 * b * min(n, 1 << 16)


def path_runner(
    path: str,
    q: torch.Tensor,
    keys: KeyBank,
    y: torch.Tensor | None,
    sdpa_kv: tuple[torch.Tensor, torch.Tensor] | None,
    coef: torch.Tensor,
    sigma: float,
    precision: str,
) -> Callable[[], torch.Tensor]:
    # y and sdpa_kv are set whenever a baseline runs (run_global_bench skips it otherwise)
    if path == "naive":
        return lambda: baselines.naive(q, cast(torch.Tensor, y), coef)
    if path == "chunked":
        center = cast(torch.Tensor, y).mean(0)
        return lambda: baselines.chunked(q, cast(torch.Tensor, y), coef, center=center)
    if path == "sdpa":
        kv = cast("tuple[torch.Tensor, torch.Tensor]", sdpa_kv)
        return lambda: baselines.sdpa(q, kv[0], kv[1], coef)
    return lambda: softmax_retrieval(q, keys, sigma, backend=path, dtype=torch.float32, precision=precision).mean


def path_unavailable(path: str, device: torch.device, b: int) -> str | None:
    """None when ``path`` can run here, else why not."""
    if path in BASELINES or path == "torch":
        return None
    if path == "cpu":
        from ..ops import cpu_backend

        return None if device.type == "cpu" and cpu_backend.available() else "C++ kernel runs on CPU tensors only"
    if path == "triton":
        from ..ops import triton_backend

        if device.type == "cpu" and triton_backend.interpreting():
            return "Triton under the CPU interpreter: not a timing"
        return triton_backend.unavailable_reason(device)
    if path == "cuda":
        from ..ops.retrieval import _cuda_backend

        cuda = _cuda_backend()
        return None if device.type == "cuda" and cuda.available() else (cuda.unavailable_reason() or "no GPU")
    return f"unknown path {path!r}"


def run_global_bench(
    dims: Iterable[int],
    ns: Iterable[int],
    batches: Iterable[int],
    *,
    paths: Iterable[str] = PATHS,
    precisions: Iterable[str] = ("exact",),
    sigma: float = 1.0,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    seed: int = 0,
    progress: Callable[[dict[str, Any]], object] | None = None,
) -> list[dict[str, Any]]:
    """One row per (D, N, B, path, precision) with time, ratios to naive and to the best baseline, the roofline
    floor where the device is known, and the error against the float64 oracle on the first rows."""
    dev = torch.device(device)
    paths = list(paths)
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"paths: unknown {unknown}; expected some of {', '.join(PATHS)}")
    peaks = roofline.device_peaks(dev)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for d in dims:
        for n in ns:
            if dev.type == "cuda":  # made on the device: 1.28M × 12,288 bytes take minutes on the host
                u = torch.randint(
                    0,
                    256,
                    (n, d),
                    generator=torch.Generator(dev).manual_seed(seed + d + n),
                    dtype=torch.uint8,
                    device=dev,
                )
            else:
                u = torch.randint(0, 256, (n, d), generator=gen, dtype=torch.uint8)
            keys = KeyBank(u, 2 / 255, -1.0)
            need_float = any(p in BASELINES for p in paths)
            y: torch.Tensor | None = None
            sdpa_kv: tuple[torch.Tensor, torch.Tensor] | None = None
            if need_float and available_memory(dev) > 0.7 * 4 * n * (d + 1) * 3:
                y = keys.rows(0, n, torch.float32, dev)
                if "sdpa" in paths:
                    sdpa_kv = baselines.sdpa_inputs(y)
            for b in batches:
                idx = torch.randint(0, n, (b,), generator=gen)
                q = (keys.gather(idx, torch.float32).cpu() + sigma * torch.randn(b, d, generator=gen)).to(dev)
                coef = torch.full((b,), 1.0 / (2 * sigma * sigma), device=dev)
                k_oracle = min(b, ORACLE_ROWS)
                ref = torch_backend.softmax_partial(
                    q[:k_oracle].double(), keys, coef[:k_oracle].double(), dtype=torch.float64, memory_budget=256 << 20
                ).mean()
                group: list[dict[str, Any]] = []
                for precision in precisions:
                    for path in paths:
                        if path in BASELINES and precision != "exact":
                            continue
                        row: dict[str, Any] = {
                            "D": d,
                            "N": n,
                            "B": b,
                            "path": path,
                            "precision": precision,
                            "device": peaks["name"] if peaks else str(dev),
                        }
                        reason = path_unavailable(path, dev, b)
                        if reason is None and path in BASELINES and y is None:
                            reason = "float rows do not fit in memory"
                        if reason is None and _path_memory(path, n, d, b) > 0.7 * available_memory(dev):
                            reason = "does not fit in memory"
                        if reason is not None:
                            row["skipped"] = reason
                            group.append(row)
                            continue
                        run = path_runner(path, q, keys, y, sdpa_kv, coef, sigma, precision)
                        try:
                            out = run()
                            row["rel_err"] = float((out[:k_oracle].double() - ref).norm() / ref.norm())
                            row["seconds"] = time_call(run, dev, repeats)
                        except (RuntimeError, ValueError) as exc:  # e.g. SDPA without a kernel for this shape
                            row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                        if path not in BASELINES:
                            row["backend_reason"] = choose_backend("auto", q, keys, torch.float32)[1]
                        floor = roofline.floor_seconds(n, d, b, 1, precision, peaks)
                        if floor is not None and "seconds" in row:
                            row["floor_seconds"] = floor
                            row["floor_fraction"] = floor / row["seconds"]
                        group.append(row)
                        if progress is not None:
                            progress(row)
                _add_ratios(group)
                rows.extend(group)
            del y, sdpa_kv
    return rows


def _add_ratios(group: list[dict[str, Any]]) -> None:
    timed = {r["path"]: r["seconds"] for r in group if "seconds" in r and r["precision"] == "exact"}
    naive = timed.get("naive")
    best = min((timed[p] for p in ("chunked", "sdpa") if p in timed), default=None)
    for r in group:
        if "seconds" not in r:
            continue
        if naive is not None:
            r["speedup_vs_naive"] = naive / r["seconds"]
        if best is not None:
            r["speedup_vs_best_torch"] = best / r["seconds"]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| D | N | B | path | precision | ms | × naive | × best torch | floor ms | % of floor | rel. err "
        "| note |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]

    def f(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    for r in rows:
        ms = r.get("seconds")
        lines.append(
            "| {D} | {N} | {B} | {path} | {precision} | {ms} | {sn} | {sb} | {fl} | {ff} | {err} | {note} |".format(
                D=r["D"],
                N=r["N"],
                B=r["B"],
                path=r["path"],
                precision=r["precision"],
                ms=f(None if ms is None else ms * 1e3, ".3g"),
                sn=f(r.get("speedup_vs_naive"), ".2f"),
                sb=f(r.get("speedup_vs_best_torch"), ".2f"),
                fl=f(None if r.get("floor_seconds") is None else r["floor_seconds"] * 1e3, ".3g"),
                ff=f(None if r.get("floor_fraction") is None else 100 * r["floor_fraction"], ".0f"),
                err=f(r.get("rel_err"), ".1e"),
                note=r.get("skipped", ""),
            )
        )
    return "\n".join(lines)
