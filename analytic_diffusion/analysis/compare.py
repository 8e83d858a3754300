"""The job behind ``analytic-diffusion compare``: how closely do analytic denoisers track a trained network?

The network (a checkpoint loaded by :func:`analytic_diffusion.networks.load_network`, or an analytic method
given as ``method:NAME``) is the reference. Each analytic method is compared with it

* along trajectories: every model samples its own path from the same seeds; per step the MSE and r² of x̂0
  against the network's x̂0 on the network's path ("trajectory") and against the network evaluated on the
  method's own x_t ("single"); the final samples by Kamb's Pearson r (not squared) per seed and its median;
* in single steps: all models denoise the same held-out images noised at each σ of the sampler's grid (MSE, r²,
  cosine similarity of the scores);
* by memorisation and novelty: the NN1/NN2 ratio of each model's samples, and the distance-to-train
  distribution of the samples against that of held-out images (Mann–Whitney z; see metrics/novelty.py).

r² always uses the network's variance (studio definition, docs/methods.md §5). The report folder holds
metrics.json, config.json, samples.npz, samples.png (one labelled row per model, same seeds in each column),
r²/MSE-vs-σ plots and summary.md.

Held-out images: with ``subset`` N the training set is the first N stored images and the held-out images are
the next ones; without a subset the last ``max(n_test, n_single)`` stored images are held out and the rest is
the training set. Distances-to-train are to that training set; for a network trained elsewhere they say how
close its samples come to *this* data, not to its own training set.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..metrics.agreement import seed_list, to_jsonable
from ..metrics.novelty import nearest_train_distance, novelty
from .agreement import single_step, trajectories

if TYPE_CHECKING:
    from ..data import Dataset
    from ..data.transforms import Resolution
    from ..denoisers import Denoiser

__all__ = ["METHOD_PREFIX", "load_network_spec", "parse_methods", "run_compare", "split_methods_options"]

METHOD_PREFIX = "method:"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_methods(methods: str | Iterable[str]) -> list[str]:
    """'optimal, wiener' or a list -> validated, de-duplicated list of analytic method names."""
    from ..denoisers import DENOISERS

    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = [m for m in names if m]
    if not names:
        raise ValueError("methods: give at least one analytic method, e.g. --methods optimal,wiener")
    unknown = [m for m in names if m not in DENOISERS]
    if unknown:
        raise ValueError(
            f"methods: unknown method(s) {', '.join(map(repr, unknown))}; expected names from: {', '.join(DENOISERS)}"
        )
    return list(dict.fromkeys(names))


def split_methods_options(
    names: Sequence[str], options: dict[str, Any] | None, *, extra: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Per method, the keyword options from ``options`` that it takes (``denoiser_options``).

    An option that no listed method takes is an error (a typo or a flag for the wrong method). ``extra``
    (backend, dtype) is passed wherever accepted, silently.
    """
    from ..denoisers import denoiser_options

    options = dict(options or {})
    out: dict[str, dict[str, Any]]
    used: set[str]
    out, used = {}, set()
    for name in names:
        valid = set(denoiser_options(name))
        opts = {k: v for k, v in options.items() if k in valid}
        used.update(opts)
        opts.update({k: v for k, v in (extra or {}).items() if k in valid})
        out[name] = opts
    unused = sorted(set(options) - used)
    if unused:
        raise ValueError(f"option(s) {', '.join(unused)} apply to none of the methods {', '.join(names)}")
    return out


def _network_method(network: object) -> str | None:
    """The method name of a ``method:NAME`` spec (validated), else None."""
    if isinstance(network, str) and network.startswith(METHOD_PREFIX):
        name = parse_methods(network[len(METHOD_PREFIX) :])
        if len(name) != 1:
            raise ValueError(f"network: method:NAME takes one method name, got {network!r}")
        return name[0]
    return None


def _check_network_spec(network: object) -> None:
    """Fail early (before any data is loaded) on an empty spec, an unknown method or a missing checkpoint."""
    if callable(network) and not isinstance(network, (str, os.PathLike)):
        return
    if not isinstance(network, (str, os.PathLike)) or not str(network).strip():
        raise ValueError("network: expected a checkpoint path or method:NAME")
    if _network_method(str(network)) is None and not os.path.exists(str(network)):
        raise FileNotFoundError(
            f"network: checkpoint {str(network)!r} does not exist (give a checkpoint file, "
            f"or method:NAME to use an analytic method as the reference)"
        )


def load_network_spec(
    network: str | os.PathLike[str] | Callable[..., torch.Tensor],
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    options: dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> tuple[Callable[..., torch.Tensor], str, dict[str, Any]]:
    """(denoiser, label, description) from a denoiser object, ``method:NAME`` or a checkpoint path.

    ``options``: keyword options of a ``method:NAME`` reference (ignored for checkpoints). ``allow_pickle``:
    also load pickled modules and NVlabs EDM network pickles (a pickle runs code: trusted files only).
    """
    from ..denoisers import make_denoiser

    _check_network_spec(network)
    if callable(network) and not isinstance(network, (str, os.PathLike)):
        label = str(getattr(network, "name", None) or type(network).__name__)
        return network, label, {"kind": "object", "name": label}
    spec = str(network)
    name = _network_method(spec)
    if name is not None:
        den = make_denoiser(name, dataset, **(options or {}))
        return den, f"{METHOD_PREFIX}{name}", {"kind": "method", "name": name, "denoiser": den.config()}
    try:
        from ..networks import load_network
    except ImportError as e:
        raise ValueError(
            f"network: cannot load checkpoints, analytic_diffusion.networks is unavailable ({e})"
        ) from None
    den = load_network(spec, device=device, allow_pickle=allow_pickle)
    shape = getattr(den, "image_shape", None)
    if shape is not None and tuple(shape) != tuple(dataset.image_shape):
        raise ValueError(
            f"network: {spec!r} works on images of shape {tuple(shape)}, the dataset's are "
            f"{tuple(dataset.image_shape)} (see --resolution / --pad-to)"
        )
    label = os.path.splitext(os.path.basename(spec))[0]
    return den, label, {"kind": "checkpoint", "path": os.path.abspath(spec), "name": label}


def _split_data(
    ds_full: Dataset, subset: int | None, n_hold: int
) -> tuple[Dataset, torch.Tensor | None, dict[str, list[int]]]:
    """(training Dataset, held-out float images (n, C, H, W) on CPU, description)."""
    total = ds_full.num_stored
    if subset is not None:
        if isinstance(subset, bool) or not isinstance(subset, int) or not 1 <= subset <= total:
            raise ValueError(f"subset: expected an integer in [1, {total}], got {subset!r}")
        n_train = subset
        n_hold = min(n_hold, total - subset)
    else:
        n_hold = min(n_hold, total - 2)
        n_train = total - n_hold
    train = ds_full.subset(n_train) if n_train < total else ds_full
    held = ds_full.images_float(torch.arange(n_train, n_train + n_hold)).cpu() if n_hold > 0 else None
    return train, held, {"train": [0, n_train], "held_out": [n_train, n_train + n_hold]}


def _save_rows(path: str, rows: dict[str, torch.Tensor], max_cols: int = 16) -> None:
    """One labelled row per model (same seed in each column)."""
    from ..viz.images import tile
    from ..viz.plots import labelled_rows

    labelled_rows(path, [(name, np.asarray(tile(x[:max_cols], min(max_cols, x.shape[0])))) for name, x in rows.items()])


def _best(values: dict[str, float]) -> str | None:
    finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    return max(finite, key=finite.get) if finite else None  # type: ignore[arg-type, unused-ignore]  # get: keys of finite


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _summary_md(report: dict[str, Any]) -> str:
    cfg = report["config"]
    m = report["methods"]
    lines = [
        f"# compare: analytic methods vs {report['network']['label']}",
        "",
        f"Dataset {cfg['dataset']}; {cfg['sampler']} sampler, {cfg['schedule']} schedule, {cfg['steps']} "
        f"steps; {len(cfg['seeds'])} seeds; single-step probes: {cfg['n_single']} held-out images.",
        "",
        "Pearson r: Kamb & Ganguli's agreement of final samples (not squared). r²: 1 − ‖x̂0 − x̂0_net‖² / "
        "(D·Var(x̂0_net)) per sample, averaged over samples and steps. Novelty z: Mann–Whitney z of the "
        "samples' distance-to-train against held-out images' (≪ 0: closer to the training set than new "
        "data, i.e. copying).",
        "",
        "| method | median Pearson r (final) | final r² | mean trajectory r² | mean single r² | "
        "mean single-step r² | mean single-step score cos | memorised | novelty z |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in m.items():
        nov = e.get("novelty", {}).get("mann_whitney", {}).get("z")
        lines.append(
            f"| {name} | {_fmt(e['final']['pearson_r_median'])} | {_fmt(e['final']['r2'])} | "
            f"{_fmt(e['headline']['trajectory_r2_mean'])} | {_fmt(e['headline']['single_r2_mean'])} | "
            f"{_fmt(e['headline']['single_step_r2_mean'])} | "
            f"{_fmt(e['headline']['single_step_score_cosine_mean'])} | "
            f"{100 * e['memorization']['memorization_ratio']:.0f}% | {_fmt(nov, 2)} |"
        )
    net = report["network"]
    nz = net.get("novelty", {}).get("mann_whitney", {}).get("z")
    lines.append(
        f"| *{net['label']}* (the reference itself) | 1 | 1 | 1 | 1 | 1 | 1 | "
        f"{100 * net['memorization']['memorization_ratio']:.0f}% | {_fmt(nz, 2)} |"
    )
    b = report["best"]
    lines += ["", "## Which method tracks the network best", ""]
    lines.append(f"* by median Pearson r of the final samples: **{b['pearson_r_median']}**")
    lines.append(f"* by mean trajectory r² of x̂0: **{b['trajectory_r2_mean']}**")
    lines.append(f"* by mean single-step r² (same noisy inputs): **{b['single_step_r2_mean']}**")
    lines += [
        "",
        "Files: metrics.json (all numbers), samples.png (one row per model, same seed per column), "
        "r2_vs_sigma.png, mse_vs_sigma.png (trajectories), single_step_r2_vs_sigma.png, "
        "single_step_mse_vs_sigma.png, samples.npz, config.json.",
        "",
    ]
    return "\n".join(lines)


def run_compare(
    *,
    network: str | os.PathLike[str] | Callable[..., torch.Tensor],
    methods: str | Iterable[str],
    dataset: str | Path | Dataset = "mnist32",
    split: str | None = None,
    subset: int | None = None,
    resolution: Resolution | None = None,
    pad_to: Resolution | None = None,
    flips: bool = False,
    steps: int = 19,
    sampler: str = "ddim",
    schedule: str = "kamb-cosine",
    schedule_kwargs: dict[str, Any] | None = None,
    seeds: int | list[int] = 8,
    seed: int = 0,
    n_single: int = 16,
    n_test: int = 256,
    method_options: dict[str, Any] | None = None,
    network_options: dict[str, Any] | None = None,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    batch_size: int | None = None,
    out: str | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Compare analytic ``methods`` with ``network`` and write the report folder ``out``; returns the report.

    network: a checkpoint path, ``method:NAME``, or a denoiser object. methods: names (list or comma string).
    seeds: a count (seeds ``seed`` … ``seed + seeds − 1``) or an explicit list. method_options: keyword options
    applied to the methods that take them (e.g. {"patch": PatchSchedule}); network_options: options of a
    ``method:NAME`` network only. allow_pickle: let a checkpoint path be a pickle (EDM's ``{'ema': net}``
    snapshots included); a pickle runs code, so trusted files only.
    """
    from ..denoisers import make_denoiser
    from ..grids import get_schedule
    from ..sampling.run import check_patch_coverage, prepare_dataset
    from ..viz.plots import line_plot

    t_start = time.perf_counter()
    names = parse_methods(methods)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    tdtype = _DTYPES[dtype]
    from ..sampling.samplers import SAMPLERS

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    seed_values = seed_list(seeds, first=seed)
    for k, v in (("n_single", n_single), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{k}: expected an integer >= 0, got {v!r}")
    extra = {"backend": backend, "dtype": tdtype}
    _check_network_spec(network)  # before any data is loaded
    net_method = _network_method(network) if isinstance(network, str) else None
    # Shared options go to every method that takes them, the method:NAME reference included.
    per_method = split_methods_options(names + ([net_method] if net_method else []), method_options, extra=extra)
    net_opts = {**per_method.get(net_method, {}), **(network_options or {})} if net_method else None
    per_method = {n: per_method[n] for n in names}
    sched = get_schedule(schedule, steps, **(schedule_kwargs or {}))
    for opts in list(per_method.values()) + [net_opts or {}]:
        if "patch" in opts:
            check_patch_coverage(opts["patch"], sched)

    ds_full = prepare_dataset(dataset, split=split, resolution=resolution, pad_to=pad_to, device=device)
    train, held, split_desc = _split_data(ds_full, subset, max(n_test, n_single))
    if flips:
        train = train.with_flips(True)
    net, net_label, net_info = load_network_spec(
        network, train, device=device, options=net_opts, allow_pickle=allow_pickle
    )
    models: dict[str, Denoiser] = {}
    for name in names:
        den = make_denoiser(name, train, **per_method[name])
        check_patch_coverage(den, sched)
        models[name] = den

    # Trajectories (progress over models).
    traj = trajectories(
        models,
        net,
        steps=steps,
        sampler=sampler,
        schedule=sched,
        seeds=seed_values,
        batch_size=batch_size,
        dtype=tdtype,
        progress=progress,
    )
    sig = traj["sigmas"]
    # Single steps on held-out images (training images if none are left over).
    probes = held[:n_single] if held is not None and n_single > 0 else None
    probe_source = "held-out"
    if probes is None or probes.shape[0] == 0:
        probes = train.images_float(torch.arange(min(max(n_single, 1), train.n))).cpu()
        probe_source = "training"
    ss = single_step(models, net, probes, sig, seed=seed, batch_size=batch_size, dtype=tdtype, progress=progress)
    # Memorisation and novelty.
    test_d = (
        nearest_train_distance(held[:n_test].to(train.device), train, backend=backend)
        if held is not None and n_test > 0 and held.shape[0] > 0
        else None
    )
    net_samples = traj["reference"]["samples"]
    net_nov = novelty(net_samples.to(train.device), train, test_distances=test_d, backend=backend)

    report_methods: dict[str, Any] = {}
    for name in names:
        t = traj["methods"][name]
        s = ss["methods"][name]
        nov = novelty(t["samples"].to(train.device), train, test_distances=test_d, backend=backend)
        report_methods[name] = {
            "denoiser": models[name].config(),
            "trajectory": t["trajectory"],
            "single": t["single"],
            "final": t["final"],
            "single_step": {k: s[k] for k in ("mse", "r2", "score_cosine")},
            "headline": {
                "trajectory_r2_mean": float(t["trajectory"]["r2"].mean()),
                "trajectory_mse_mean": float(t["trajectory"]["mse"].mean()),
                "single_r2_mean": float(t["single"]["r2"].mean()),
                "single_step_r2_mean": float(s["r2"].mean()),
                "single_step_mse_mean": float(s["mse"].mean()),
                "single_step_score_cosine_mean": float(s["score_cosine"].mean()),
            },
            "memorization": nov.pop("memorization"),
            "novelty": nov,
            "sampling_seconds": t["seconds"],
        }
    net_mem = net_nov.pop("memorization")
    best = {
        "pearson_r_median": _best({k: v["final"]["pearson_r_median"] for k, v in report_methods.items()}),
        "trajectory_r2_mean": _best({k: v["headline"]["trajectory_r2_mean"] for k, v in report_methods.items()}),
        "single_step_r2_mean": _best({k: v["headline"]["single_step_r2_mean"] for k, v in report_methods.items()}),
    }
    config = {
        "network": net_info,
        "methods": names,
        "method_options": {
            k: {o: (str(v) if not isinstance(v, (int, float, str, bool, type(None))) else v) for o, v in opts.items()}
            for k, opts in per_method.items()
        },
        "dataset": repr(train),
        "data_split": split_desc,
        "steps": steps,
        "sampler": sampler,
        "schedule": schedule if isinstance(schedule, str) else getattr(schedule, "name", str(schedule)),
        "schedule_kwargs": schedule_kwargs or {},
        "seeds": seed_values,
        "n_single": int(probes.shape[0]),
        "single_step_probes": probe_source,
        "n_test": 0 if test_d is None else int(test_d.numel()),
        "device": str(device),
        "dtype": dtype,
        "batch_size": batch_size,
    }
    report = {
        "config": config,
        "sigmas": sig,
        "grid": traj["grid"],
        "network": {
            "label": net_label,
            "memorization": net_mem,
            "novelty": net_nov,
            "sampling_seconds": traj["reference"]["seconds"],
        },
        "methods": report_methods,
        "best": best,
        "notes": {
            "pearson_r": "Kamb & Ganguli's final-sample agreement, NOT squared (their plots say r²)",
            "r2": "1 - ||a - u||^2 / (D Var(u)), u = network x0_hat, unbiased Var, 0 -> 1; mean over samples",
            "trajectory": "method x0_hat on its own path vs network x0_hat on its own path, same seed",
            "single": "method x0_hat vs network evaluated on the method's x_t",
            "single_step": "same held-out images noised with the same eps at each sigma for all models",
            "novelty": "Mann-Whitney U/z of samples' nearest-train distances vs held-out images' (z << 0: copying)",
        },
    }

    out = out or os.path.join("runs", f"compare-{net_label.split(' ')[0]}")
    os.makedirs(out, exist_ok=True)
    report["total_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(to_jsonable(report), f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(to_jsonable(config), f, indent=2)
    xs = sig.tolist()
    r2_lo = lambda series: max(-1.0, min(min(v) for v in series.values()))  # noqa: E731
    for key, label, fname_r2, fname_mse in (
        ("trajectory", "trajectory", "r2_vs_sigma.png", "mse_vs_sigma.png"),
        ("single_step", "single-step", "single_step_r2_vs_sigma.png", "single_step_mse_vs_sigma.png"),
    ):
        r2s = {n: report_methods[n][key]["r2"].tolist() for n in names}
        mses = {n: report_methods[n][key]["mse"].tolist() for n in names}
        line_plot(
            os.path.join(out, fname_r2),
            xs,
            r2s,
            xlabel="σ",
            ylabel=f"r² vs {net_label}",
            title=f"{label} r² of x̂0 vs {net_label} (clipped at −1)",
            logx=True,
            ylim=(r2_lo(r2s), 1.0),
        )
        pos = all(v > 0 for vals in mses.values() for v in vals)
        line_plot(
            os.path.join(out, fname_mse),
            xs,
            mses,
            xlabel="σ",
            ylabel="MSE of x̂0",
            title=f"{label} MSE of x̂0 vs {net_label}",
            logx=True,
            logy=pos,
        )
    rows = {net_label if net_label not in names else f"network:{net_label}": net_samples}
    rows.update({n: traj["methods"][n]["samples"] for n in names})
    _save_rows(os.path.join(out, "samples.png"), rows)
    np.savez_compressed(
        os.path.join(out, "samples.npz"),
        seeds=np.asarray(seed_values),
        network=net_samples.numpy(),
        **{f"method_{n}": traj["methods"][n]["samples"].numpy() for n in names},
    )
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(_summary_md(report))
    report["out"] = out
    if progress:
        print(
            f"compare: {len(names)} method(s) vs {net_label}, {len(seed_values)} seeds in "
            f"{report['total_seconds']:.1f} s; best by median Pearson r: {best['pearson_r_median']}; "
            f"wrote {out}/"
        )
    return report
