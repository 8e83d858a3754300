"""The benchmark harness: baselines are correct, rows carry ratios and oracle errors, the CLI writes its files."""
import json

import pytest
import torch

from analytic_diffusion.benchmark import baselines, markdown_table, roofline, run_global_bench
from analytic_diffusion.cli import main
from reference import posterior_bruteforce, rel


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
    rows = run_global_bench([30], [500], [1, 3], paths=["naive", "chunked", "sdpa", "torch", "cpu", "triton"],
                            repeats=1)
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
    # N = 50k, D = 3072 uint8, B = 1: memory bound, 154 MB / 3 TB/s (kernel-performance.md §7.1)
    assert roofline.floor_seconds(50000, 3072, 1, 1, "bf16", peaks) == pytest.approx(0.0512e-3, rel=0.01)
    # B = 1024 fp32 SIMT: compute bound, 6.3e11 / 60e12
    assert roofline.floor_seconds(50000, 3072, 1024, 4, "exact", peaks) == pytest.approx(10.5e-3, rel=0.01)
    assert roofline.floor_seconds(10, 10, 1, 1, "exact", None) is None
    assert roofline.device_peaks(torch.device("cpu")) is None


def test_bench_cli_global_and_e2e(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "global", "--dims", "16", "--n", "200", "--batches", "2", "--paths", "naive,cpu",
                 "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["path"] for r in rows] == ["naive", "cpu"] and "| cpu |" in (out / "table.md").read_text()
    res_file = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--n-train", "50", "--shape", "1,4,4", "--samples", "3", "--steps", "3",
                 "--device", "cpu", "--out", str(res_file)]) == 0
    res = json.loads(res_file.read_text())
    assert res["finite"] and res["samples"] == 3 and res["seconds"] > 0
    assert main(["bench", "global", "--precisions", "fp8", "--device", "cpu"]) == 2
    assert "precision" in capsys.readouterr().err


def test_bench_local_rows_and_naive_els(tmp_path):
    from analytic_diffusion.benchmark.local_bench import markdown_table as local_table, run_local_bench
    rows = run_local_bench(["ls", "els", "pspc", "pca_locality"], [3], n=20, shape=(1, 6, 6),
                           paths=["naive", "torch", "triton", "cuda"], sigma=0.5)
    els_naive = next(r for r in rows if r["method"] == "els" and r["path"] == "naive")
    assert els_naive["rel_err"] < 1e-4  # the naive baseline computes the same ELS
    assert all(r["rel_err"] < 1e-4 for r in rows if "seconds" in r)
    assert "interpreter" in next(r for r in rows if r["path"] == "triton")["skipped"]
    assert "CUDA device" in next(r for r in rows if r["path"] == "cuda" and r["method"] == "ls")["skipped"]
    assert "Triton only" in next(r for r in rows if r["path"] == "cuda" and r["method"] == "pca_locality")["skipped"]
    assert "| els | 3 | 20 | 1 | torch |" in local_table(rows)
    assert "| pspc | 3 | 20 | 1 | torch |" in local_table(rows)
    pca = next(r for r in rows if r["method"] == "pca_locality" and r["path"] == "torch")
    assert pca["k"] is None and pca["threshold"] == 0.005 and 1 <= pca["mean_support"] <= 36
    assert "θ = 0.005: mask support" in local_table(rows)
    assert main(["bench", "local", "--methods", "ls", "--patch", "1", "--n-train", "8", "--shape", "1,4,4",
                 "--paths", "torch", "--device", "cpu", "--out", str(tmp_path / "loc")]) == 0
    assert (tmp_path / "loc" / "table.md").exists()
