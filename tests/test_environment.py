"""Environment variables and size flags: each parsed by one rule (analytic_diffusion.env), a bad value refused in one
line naming it before any work (issue 24, "sizes and environment"), and a second Ctrl-C during exit stays quiet."""

import os
import subprocess
import sys
import textwrap

import pytest

from analytic_diffusion import env
from analytic_diffusion.cli import describe_os_error, main

FAST = ["sample", "--subset", "40", "--n", "2", "--steps", "2", "--no-progress", "--method", "nearest"]

BAD_VALUES = [
    ("AD_MEMORY_BUDGET", "abc", "expected a size such as 64M"),
    ("AD_MEMORY_BUDGET", "inf", "finite size"),
    ("AD_MEMORY_BUDGET", "0", "at least 1 byte"),
    ("AD_DIST_TIMEOUT", "abc", "seconds > 0"),
    ("AD_DIST_TIMEOUT", "0", "seconds > 0"),
    ("AD_DIST_TIMEOUT", "-1", "seconds > 0"),
    ("AD_DIST_TIMEOUT", "nan", "seconds > 0"),
    ("AD_NUM_THREADS", "bogus", "integer >= 1"),
    ("AD_THREADS", "bogus", "integer >= 1"),
    ("AD_THREADS", "0", "integer >= 1"),
    ("AD_NOTEBOOK_SIZE", "bogus", "ci, full, gpu"),
    ("AD_CPU_ISA", "bogus", "base, avx2, avx512"),
    ("WORLD_SIZE", "two", "non-negative integer"),
]


@pytest.mark.parametrize("name,value,expected", BAD_VALUES, ids=[f"{n}={v}" for n, v, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_the_variable(name, value, expected, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=expected) as info:
        env.read(name)
    assert str(info.value).startswith(f"{name}: ") and repr(value) in str(info.value)


@pytest.mark.parametrize("name,value,expected", BAD_VALUES, ids=[f"{n}={v}" for n, v, _ in BAD_VALUES])
def test_the_cli_refuses_a_bad_variable_in_one_line_before_any_work(name, value, expected, monkeypatch, capsys):
    monkeypatch.setenv(name, value)
    assert main([*FAST, "--out", "never-written"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {name}: ") and "Traceback" not in err
    assert not os.path.exists("never-written")


@pytest.mark.parametrize(
    "text,expected",
    [("64M", 64 * 2**20), ("64MiB", 64 * 2**20), ("2g", 2 * 2**30), ("1e3", 1000), ("4096", 4096), ("1.5K", 1536)],
)
def test_sizes_parse_alike_in_the_flag_and_the_variable(text, expected, monkeypatch):
    from analytic_diffusion.cli.common import parse_bytes

    monkeypatch.setenv("AD_MEMORY_BUDGET", text)
    assert env.read("AD_MEMORY_BUDGET") == parse_bytes(text) == expected


def test_the_defaults_hold_when_unset_or_empty(monkeypatch):
    for name in env.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert env.read("AD_MEMORY_BUDGET") == 256 * 2**20 and env.read("AD_DIST_TIMEOUT") == 120.0
    assert env.read("AD_NOTEBOOK_SIZE") == "full" and env.read("WORLD_SIZE") == 1
    monkeypatch.setenv("AD_NUM_THREADS", "")
    assert env.read("AD_NUM_THREADS") is None
    env.check()


def test_cache_dir_that_is_a_file_is_refused(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setenv("AD_CACHE_DIR", str(f))
    with pytest.raises(ValueError, match="AD_CACHE_DIR: .* is a file"):
        env.check()


@pytest.mark.parametrize("flag", ["inf", "nan", "-5", "abc", "0"])
def test_memory_budget_flag_refuses_non_sizes_in_one_line(flag, capsys):
    with pytest.raises(SystemExit) as info:
        main([*FAST, "--memory-budget", flag, "--out", "never-written"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--memory-budget" in err and "Traceback" not in err and "OverflowError" not in err


def test_threads_flag_uses_the_same_rule():
    from analytic_diffusion.cli.common import set_threads

    with pytest.raises(ValueError, match="--threads: expected an integer >= 1, got 0"):
        set_threads(0)


def test_memory_budget_of_64M_in_the_environment_is_read_at_import():
    """The help says 64M: the import-time default honours it (it raised ValueError at import before)."""
    code = "import analytic_diffusion.ops as o, analytic_diffusion.ops.triton_backend as t; "
    code += "print(o.DEFAULT_MEMORY_BUDGET, t.LOGIT_BUDGET)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "AD_MEMORY_BUDGET": "64M"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(64 * 2**20)] * 2


def test_os_errors_are_described_with_what_to_do(tmp_path):
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npy"))
    assert describe_os_error(full).endswith("(the disk is full: free some space or write somewhere else)")
    assert str(tmp_path / "x.npy") in describe_os_error(full)
    ro = OSError(errno.EROFS, "Read-only file system")
    assert "choose a folder you can write to" in describe_os_error(ro)


def test_a_second_ctrl_c_during_exit_is_quiet(tmp_path):
    """Ctrl-C stops the run ("interrupted", 130); another one while the interpreter shuts down ends it at once,
    without the traceback an exit handler would print."""
    script = textwrap.dedent(
        """
        import atexit, os, signal, sys, time
        import analytic_diffusion.cli as cli

        def slow_exit_handler():  # stands in for torch's exit handlers; the user presses Ctrl-C meanwhile
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)

        atexit.register(slow_exit_handler)

        def interrupted(args):
            raise KeyboardInterrupt

        parser = cli.build_parser
        def patched():
            p = parser()
            p.set_defaults(func=interrupted)
            for action in p._subparsers._group_actions:
                for sub in action.choices.values():
                    sub.set_defaults(func=interrupted)
            return p
        cli.build_parser = patched
        sys.argv = ["analytic-diffusion", "info"]
        cli.entry_point()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 130, out.stderr
    assert out.stderr.strip() == "interrupted", out.stderr
