"""The benchmark harness: baselines are correct, rows carry ratios and oracle errors, the CLI writes its files."""

import json

import pytest
import torch
from reference import posterior_bruteforce, rel

from analytic_diffusion.benchmark import baselines, markdown_table, roofline, run_global_bench
from analytic_diffusion.cli import main


@pytest.mark.parametrize("sigma", [0.05, 1.0, 30.0])
def test_baselines_match_bruteforce(rng, sigma):
    y = torch.rand(300, 20, generator=rng) * 2 - 1
    q = y[:5] + sigma * torch.randn(5, 20, generator=rng)
    coef = torch.full((5,), 1 / (2 * sigma * sigma))
    ref = posterior_bruteforce(q, y, torch.full((5,), sigma))[0]
    assert rel(baselines.naive(q, y, coef), ref) < 1e-4
    assert rel(baselines.chunked(q, y, coef, chunk=64), ref) < 1e-4
    k, v = baselines.sdpa_inputs(y)
    assert rel(baselines.sdpa(q, k, v, coef), ref) < 1e-4


def test_run_global_bench_rows_and_ratios():
    rows = run_global_bench(
        [30], [500], [1, 3], paths=["naive", "chunked", "sdpa", "torch", "cpu", "triton"], repeats=1
    )
    assert {(r["B"], r["path"]) for r in rows} >= {(1, "naive"), (3, "cpu")}
    timed = [r for r in rows if "seconds" in r]
    assert all(r["rel_err"] < 1e-4 and r["seconds"] > 0 for r in timed)
    naive = next(r for r in rows if r["path"] == "naive" and r["B"] == 1)
    assert naive["speedup_vs_naive"] == pytest.approx(1.0)
    assert all("speedup_vs_best_torch" in r for r in timed)
    triton = next(r for r in rows if r["path"] == "triton")
    assert "interpreter" in triton["skipped"]  # never timed under the interpreter
    assert "| 30 | 500 | 1 | naive |" in markdown_table(rows)
    with pytest.raises(ValueError, match="paths"):
        run_global_bench([30], [10], [1], paths=["cublas"])


def test_roofline_floor_model():
    peaks = roofline.DEVICES["H100"]
    # N = 50k, D = 3072 uint8, B = 1: memory bound, 154 MB / 3 TB/s (docs/design.md §9.1)
    assert roofline.floor_seconds(50000, 3072, 1, 1, "bf16", peaks) == pytest.approx(0.0512e-3, rel=0.01)
    # B = 1024 fp32 SIMT: compute bound, 6.3e11 / 60e12
    assert roofline.floor_seconds(50000, 3072, 1024, 4, "exact", peaks) == pytest.approx(10.5e-3, rel=0.01)
    assert roofline.floor_seconds(10, 10, 1, 1, "exact", None) is None
    assert roofline.device_peaks(torch.device("cpu")) is None


def test_bench_cli_global_and_e2e(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "global",
                "--dims",
                "16",
                "--n",
                "200",
                "--batches",
                "2",
                "--paths",
                "naive,cpu",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads((out / "results.json").read_text())
    assert [r["path"] for r in rows] == ["naive", "cpu"] and "| cpu |" in (out / "table.md").read_text()
    res_file = tmp_path / "e2e.json"
    assert (
        main(
            [
                "bench",
                "e2e",
                "--n-train",
                "50",
                "--shape",
                "1,4,4",
                "--samples",
                "3",
                "--steps",
                "3",
                "--device",
                "cpu",
                "--out",
                str(res_file),
            ]
        )
        == 0
    )
    res = json.loads(res_file.read_text())
    assert res["finite"] and res["samples"] == 3 and res["seconds"] > 0
    assert main(["bench", "global", "--precisions", "fp8", "--device", "cpu"]) == 2
    assert "precision" in capsys.readouterr().err


def test_patch_floor_model():
    peaks = roofline.DEVICES["H100"]
    # CIFAR-10 ELS, k = 3, valid candidates: 1024 × 45.0M pairs; exp-bound 11.8 ms (docs/design.md §9.3)
    f = roofline.patch_floor_seconds(1024 * 50000 * 30 * 30, 27, peaks)
    assert f["exp_mma"] == pytest.approx(11.8e-3, rel=0.01)
    # k = 15: MMA-bound, 2 · 1024 · 16.2M · (688 + 16) / 790e12 ≈ 29.6 ms; SIMT direct form far above
    f = roofline.patch_floor_seconds(1024 * 50000 * 18 * 18, 675, peaks)
    assert f["exp_mma"] == pytest.approx(29.6e-3, rel=0.01) and f["simt"] > 10 * f["exp_mma"]
    assert roofline.patch_floor_seconds(10, 27, None) is None


def test_patch_pair_counts():
    from analytic_diffusion.data.dataset import Dataset
    from analytic_diffusion.denoisers import make_denoiser

    ds = Dataset(torch.zeros(7, 2, 6, 5, dtype=torch.uint8))
    # ELS: every pixel against every interior patch of every image (×2 with flips)
    assert make_denoiser("els", ds).pairs_per_image(3) == 30 * (4 * 3) * 7
    assert make_denoiser("els", ds, flips=True).pairs_per_image(3) == 2 * 30 * 12 * 7
    # bbELS with k ≥ H: every pixel is a corner (the LS rule, one candidate per image)
    assert make_denoiser("bbels", ds).pairs_per_image(13) == 30 * 7
    with pytest.raises(ValueError, match="patch"):
        make_denoiser("els", ds).pairs_per_image(4)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 20.0])
def test_studio_els_computes_els(rng, sigma):
    """The studio-style baseline (conv2d over chunks, materialised logits) is the same ELS as ours."""
    from analytic_diffusion.benchmark.local_bench import studio_chunk, studio_els
    from analytic_diffusion.data.dataset import Dataset
    from analytic_diffusion.denoisers import make_denoiser

    ds = Dataset(torch.randint(0, 256, (7, 2, 6, 5), generator=rng, dtype=torch.uint8))
    x = ds.images_float(torch.arange(2), torch.float64) + sigma * torch.randn(
        2, 2, 6, 5, generator=rng, dtype=torch.float64
    )
    for k in (1, 3, 5):
        ref = make_denoiser("els", ds, dtype=torch.float64, patch=k)(x, sigma)
        got = studio_els(x, ds.images_float(dtype=torch.float64), k, sigma, chunk=3)  # 3 chunks: 3 + 3 + 1
        assert rel(got, ref) < 1e-9, k
    # chunk from memory: 2 · 4 bytes · B · (H−k+1)(W−k+1) · H·W per image, a quarter of memory, at most 512
    assert studio_chunk(2, (2, 6, 5), 3, 4 * (2 * 4 * 2 * 12 * 30) * 10) == 10
    assert studio_chunk(1, (3, 32, 32), 3, 1 << 50) == 512 and studio_chunk(64, (3, 32, 32), 3, 1000) == 1


def test_bench_local_rows_and_naive_els(tmp_path):
    from analytic_diffusion.benchmark.local_bench import markdown_table as local_table
    from analytic_diffusion.benchmark.local_bench import run_local_bench

    rows = run_local_bench(
        ["ls", "els", "pspc", "pca_locality"],
        [3],
        n=20,
        shape=(1, 6, 6),
        paths=["naive", "studio", "torch", "cpu", "triton", "cuda"],
        sigma=0.5,
    )
    assert {r["method"] for r in rows if r["path"] == "cpu" and "seconds" in r} == {"ls", "els", "pspc", "pca_locality"}
    els_naive = next(r for r in rows if r["method"] == "els" and r["path"] == "naive")
    assert els_naive["rel_err"] < 1e-4  # the naive baseline computes the same ELS
    els_studio = next(r for r in rows if r["method"] == "els" and r["path"] == "studio")
    assert els_studio["rel_err"] < 1e-4 and els_studio["studio_chunk"] == 20
    assert "written for ELS only" in next(r for r in rows if r["method"] == "ls" and r["path"] == "studio")["skipped"]
    assert "training images per conv2d chunk" in local_table(rows)
    with pytest.raises(ValueError, match="paths"):
        run_local_bench(["els"], [3], n=4, shape=(1, 6, 6), paths=["torch", "cudnn"])
    els_torch = next(r for r in rows if r["method"] == "els" and r["path"] == "torch")
    assert els_torch["pairs_per_image"] == 36 * 16 * 20 and "floor_ms" not in els_torch  # no floor on a CPU
    assert all(r["rel_err"] < 1e-4 for r in rows if "seconds" in r)
    assert "interpreter" in next(r for r in rows if r["path"] == "triton")["skipped"]
    assert "CUDA device" in next(r for r in rows if r["path"] == "cuda" and r["method"] == "ls")["skipped"]
    assert "CUDA device" in next(r for r in rows if r["path"] == "cuda" and r["method"] == "pca_locality")["skipped"]
    assert "| els | 3 | 20 | 1 | torch |" in local_table(rows)
    assert "| pspc | 3 | 20 | 1 | torch |" in local_table(rows)
    pca = next(r for r in rows if r["method"] == "pca_locality" and r["path"] == "torch")
    assert pca["k"] is None and pca["threshold"] == 0.005 and 1 <= pca["mean_support"] <= 36
    assert "θ = 0.005: mask support" in local_table(rows)
    assert (
        main(
            [
                "bench",
                "local",
                "--methods",
                "ls",
                "--patch",
                "1",
                "--n-train",
                "8",
                "--shape",
                "1,4,4",
                "--paths",
                "torch",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "loc"),
            ]
        )
        == 0
    )
    assert (tmp_path / "loc" / "table.md").exists()
