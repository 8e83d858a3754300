"""The host-emulator build cache (tests/cuda_emu/build.py): a changed source gives a new key and a rebuild, a
finished build is reused, concurrent callers build once, a failed build leaves nothing behind, stale builds go."""

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from cuda_emu import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_sources(tmp_path):
    cuda, emu = tmp_path / "csrc" / "cuda", tmp_path / "cuda_emu"
    shutil.copytree(build.CUDA_DIR, cuda)
    shutil.copytree(build.HERE, emu, ignore=shutil.ignore_patterns("__pycache__"))
    return str(cuda), str(emu)


def test_key_follows_every_source(tmp_path):
    reason = build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA host emulation unavailable: {reason}")
    cuda, emu = _copy_sources(tmp_path)
    base = build.source_key(cuda, emu)
    assert base == build.source_key(), "an identical copy of the sources must give the same key"
    keys = {base}
    for folder, name in (
        (cuda, "patch_retrieval.cu"),
        (cuda, "global_retrieval.cuh"),
        (cuda, "bindings.cpp"),
        (emu, "emu.h"),
        (emu, "build.py"),
    ):
        path = os.path.join(folder, name)
        with open(path, "rb") as fh:
            original = fh.read()
        with open(path, "ab") as fh:
            fh.write(b"\n// changed\n")
        keys.add(build.source_key(cuda, emu))
        with open(path, "wb") as fh:
            fh.write(original)
        assert build.source_key(cuda, emu) == base
    with open(os.path.join(cuda, "new_kernel.cuh"), "w") as fh:
        fh.write("#pragma once\n")
    keys.add(build.source_key(cuda, emu))
    assert len(keys) == 7, "each changed or added source must change the key"


def _counting_builder(calls, delay=0.0, fail=False):
    def build_into(folder):
        calls.append(folder)
        time.sleep(delay)
        if fail:
            raise RuntimeError("compiler failed")
        path = os.path.join(folder, "mod.so")
        with open(path, "w") as fh:
            fh.write(str(len(calls)))
        return path

    return build_into


def test_cache_builds_once_per_key_and_rebuilds_on_a_new_key(tmp_path):
    calls = []
    first = build.cached(str(tmp_path), "a" * 24, _counting_builder(calls))
    assert build.cached(str(tmp_path), "a" * 24, _counting_builder(calls)) == first
    assert len(calls) == 1 and Path(first).read_text() == "1"
    second = build.cached(str(tmp_path), "b" * 24, _counting_builder(calls))
    assert len(calls) == 2 and second != first and Path(second).read_text() == "2"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n], "no work folder may stay behind"


def test_concurrent_callers_build_once(tmp_path):
    calls, results = [], []
    builder = _counting_builder(calls, delay=0.3)
    threads = [
        threading.Thread(target=lambda: results.append(build.cached(str(tmp_path), "c" * 24, builder)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1


def test_failed_build_leaves_nothing_and_is_retried(tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="compiler failed"):
        build.cached(str(tmp_path), "d" * 24, _counting_builder(calls, fail=True))
    assert sorted(os.listdir(tmp_path)) == ["d" * 24 + ".lock"]
    path = build.cached(str(tmp_path), "d" * 24, _counting_builder(calls))
    assert len(calls) == 2 and os.path.isfile(path)


def test_stale_builds_of_other_keys_are_removed(tmp_path):
    calls = []
    old = os.path.dirname(build.cached(str(tmp_path), "e" * 24, _counting_builder(calls)))
    recent = os.path.dirname(build.cached(str(tmp_path), "f" * 24, _counting_builder(calls)))
    month_ago = time.time() - 30 * 86400
    os.utime(old, (month_ago, month_ago))
    build.cached(str(tmp_path), "g" * 24, _counting_builder(calls))
    assert not os.path.exists(old) and os.path.isdir(recent)
