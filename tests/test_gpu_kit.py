"""The GPU kit (bench/gpu_check.sh), the CUDA build plan (csrc/cuda_build_plan.py) and the benchmark timer.

* The build plan, with fake environments / nvcc paths / GPUs: when the CUDA extension is built, that a build on a
  GPU machine is required (a failed nvcc fails the install), which architectures are compiled, and that the
  parallel compile reports every failing command.
* ``time_call`` on the CPU: the median of the timed calls, after one warm-up call.
* The kit's dry run (the same steps on the CPU at tiny sizes) ends with every section ok and a summary with the
  tables; its header's expected GPU times add up to at most 8 minutes, and its sections are the issue's list.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT = os.path.join(ROOT, "bench", "gpu_check.sh")
SECTIONS = ["env", "install", "tests", "global50k", "local_els", "local_base", "local_ls", "pca", "e2e", "in64"]


def _plan_module():
    spec = importlib.util.spec_from_file_location("cuda_build_plan", os.path.join(ROOT, "csrc", "cuda_build_plan.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ CUDA build plan
def test_build_plan_rules():
    P = _plan_module()
    nvcc = "/usr/local/cuda/bin/nvcc"
    p = P.plan({}, nvcc, True, "90", "torch")  # a GPU machine with nvcc: build, and a failure fails the install
    assert (
        p.build
        and p.required
        and p.arch_flags == ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90a,code=compute_90a"]
    )
    p = P.plan({}, nvcc, True, None, "/dev/nvidia0")  # GPU of unknown architecture (isolated build, no nvidia-smi)
    assert p.build and p.required and p.arch_flags == P.FALLBACK_ARCH_FLAGS
    p = P.plan({"AD_CUDA_ARCH": "8.6"}, nvcc, True, "90")  # the override wins
    assert p.arch_flags == ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_86,code=compute_86"]
    assert not P.plan({}, nvcc, False, None).build  # no GPU: nothing to build for
    p = P.plan({"AD_BUILD_CUDA": "1"}, nvcc, False, None)
    assert p.build and p.required and p.arch_flags == P.FALLBACK_ARCH_FLAGS
    assert not P.plan({"AD_BUILD_CUDA": "0"}, nvcc, True, "90").build
    p = P.plan({}, None, True, "90", "nvidia-smi")  # a GPU without nvcc: installs, but says so loudly
    assert not p.build and "NOT BUILT" in p.message and "GPU" in p.message
    with pytest.raises(RuntimeError, match="nvcc"):
        P.plan({"AD_BUILD_CUDA": "1"}, None, False, None)
    with pytest.raises(ValueError, match="AD_BUILD_CUDA"):
        P.plan({"AD_BUILD_CUDA": "yes"}, nvcc, True, "90")
    with pytest.raises(ValueError, match="AD_CUDA_ARCH"):
        P.arch_flags("hopper")
    assert P.arch_flags("sm_90a") == P.arch_flags("9.0") == P.arch_flags("90")
    assert P.arch_flags("100a")[0] == "-gencode=arch=compute_100a,code=sm_100a"


def test_nvcc_commands_run_in_parallel_and_report_failures(tmp_path):
    P = _plan_module()
    cmds = P.nvcc_commands("nvcc", ["-O3"], ["-gencode=x"], ["inc"], ["a/k1.cu", "a/k2.cu"], str(tmp_path))
    assert [o for o, _ in cmds] == [str(tmp_path / "k1.o"), str(tmp_path / "k2.o")]
    assert cmds[0][1] == ["nvcc", "-O3", "-gencode=x", "-Iinc", "-c", "a/k1.cu", "-o", str(tmp_path / "k1.o")]
    ok, bad = [sys.executable, "-c", "pass"], [sys.executable, "-c", "import sys; sys.exit('boom 42')"]
    P.run_parallel([ok, ok])
    with pytest.raises(RuntimeError, match="boom 42"):
        P.run_parallel([ok, bad, ok])


def test_setup_uses_the_plan():
    with open(os.path.join(ROOT, "setup.py")) as f:
        text = f.read()
    assert "cuda_build_plan.plan(" in text and "cuda_build_plan.run_parallel(" in text
    assert "not built (nvcc failed" not in text  # no silent fallback after a failed nvcc


# --------------------------------------------------------------------------------------------------- timer
def test_time_call_is_the_median_after_a_warm_up(monkeypatch):
    from analytic_diffusion.benchmark import global_bench

    ticks = iter([0.0, 1.0, 10.0, 10.5, 20.0, 29.0])  # calls of 1, 0.5 and 9 s after the warm-up
    monkeypatch.setattr(global_bench.time, "perf_counter", lambda: next(ticks))
    calls = []
    assert global_bench.time_call(lambda: calls.append(1), torch.device("cpu"), 3) == 1.0
    assert len(calls) == 4


def test_time_call_on_a_gpu_flushes_l2_before_every_timed_call(monkeypatch):
    """The CUDA path with fake events: one L2-sized write before each timed call (not inside the timed span),
    event times in ms, the median in seconds."""
    from analytic_diffusion.benchmark import global_bench

    log, spans = [], iter([3.0, 1.0, 2.0])

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            log.append("record")

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return next(spans)

    class FakeFlush:
        def zero_(self):
            log.append("flush")

    monkeypatch.setattr(global_bench.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(global_bench, "_l2_flush_buffer", lambda device: FakeFlush())
    monkeypatch.setattr(global_bench, "_sync", lambda device: None)
    got = global_bench.time_call(lambda: log.append("call"), torch.device("cuda"), 3)
    assert got == 2.0e-3
    assert log == ["call"] + ["flush", "record", "call", "record"] * 3


# ----------------------------------------------------------------------------------------------- the kit
def _header():
    with open(KIT) as f:
        return [line for line in f.read().split("\nset -u")[0].splitlines() if line.startswith("#")]


def test_kit_header_budget_and_sections():
    head = _header()
    expected, current = {}, None
    for line in head:
        m = re.match(r"#   (\w+)\s", line)
        if m and m.group(1) != "total":
            current = m.group(1)
        t = re.search(r"~(\d+) s\b", line)
        if t and current is not None:
            expected[current] = int(t.group(1))
            current = None
    assert list(expected) == SECTIONS
    assert sum(expected.values()) <= 8 * 60
    text = "\n".join(head)
    for must in (
        "N=50k D=3072 B=1,64,1024 exact+bf16",
        "N=1.28M D=12288 B=256",
        "k=3,7 over 10k",
        "B=8",
        "LS, PSPC",
        "over 50k, B=64",
        "pca_locality",
        "1000 CIFAR-shaped optimal samples over 50k",
    ):
        assert must in text, must
    with open(KIT) as f:
        body = f.read()
    for flag in (
        "--dims 3072 --n 50000 --batches 1,64,1024 --precisions exact,bf16",
        "--dims 12288 --n 1280000 --batches 256",
        "--methods els,bbels --patch 3,7 --n-train 10000",
        "--batch 8",
        "--methods ls,pspc --patch 3,7 --n-train 50000",
        "--methods pca_locality",
        "--samples 1000",
        "pip install --no-build-isolation --no-deps -e .",
    ):
        assert flag in body, flag


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_kit_dry_run(tmp_path):
    """The whole kit on the CPU at tiny sizes (CI: the emulator tests it would add run elsewhere in the suite)."""
    out = tmp_path / "kit"
    env = dict(os.environ, AD_GPU_CHECK_NO_EMU="1", PYTHON=sys.executable)
    r = subprocess.run(
        ["bash", KIT, "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    status = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()]
    assert [s[0] for s in status] == SECTIONS and all(s[1] == "ok" for s in status), status
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    for table in (
        "### global50k",
        "### in64",
        "### local_els",
        "### local_base",
        "### local_ls",
        "### pca_b64",
        "### e2e",
    ):
        assert table in summary, table
    assert "| 48 | 257 | 3 | naive | exact |" in summary  # a timed row of the global table
    assert "| els | 3 | 4 | 1 | studio |" in summary and "| bbels | 3 | 6 | 2 | cpu |" in summary


def test_kit_stops_and_names_the_failed_section(tmp_path):
    """A failing section before the benchmark stops the run with a message naming it (install here: a python
    that cannot import the package)."""
    out = tmp_path / "kit"
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    r = subprocess.run(
        ["bash", KIT, "--dry-run", str(out)],
        cwd=ROOT,
        env=dict(os.environ, PYTHON=str(fake)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "STOP: install failed" in r.stdout
    assert "| install | failed (rc 3) |" in (out / "summary.md").read_text()
