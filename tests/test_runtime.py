"""healdust.runtime: memory reuse and the one-OpenMP-team rule, in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from healdust.runtime import on_short_thread


def run_python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_on_short_thread_returns_and_raises_on_another_thread():
    import threading

    me = threading.get_ident()
    assert on_short_thread(lambda a, b=0: (a + b, threading.get_ident()), 2, b=3)[0] == 5
    assert on_short_thread(threading.get_ident) != me
    with pytest.raises(KeyError, match="gone"):
        on_short_thread(lambda: {}["gone"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_a_short_thread_takes_its_openmp_team_with_it():
    """torch work on a short-lived thread leaves no OpenMP helper threads behind; the
    same work on a thread that stays (here the main thread) does, which is what makes
    the daemon's worker slow when two threads keep teams (runtime.py)."""
    out = run_python("""
        import os, time, torch
        from healdust.runtime import on_short_thread
        if torch.get_num_threads() < 2:
            torch.set_num_threads(2)
        def tasks():
            return len(os.listdir("/proc/self/task"))
        def work():
            x = torch.ones(4_000_000)
            return float(x.add_(1).sum())   # large enough to run in parallel
        before = tasks()
        assert on_short_thread(work) == 8_000_000.0
        deadline = time.monotonic() + 5
        while tasks() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        after_short = tasks()
        work()
        print(before, after_short, tasks())
    """)
    before, after_short, after_main = map(int, out.split())
    assert after_short == before
    assert after_main > before  # the control: the same work here keeps a team


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and needs glibc")
def test_freed_memory_is_kept_and_given_back_on_glibc():
    """By default glibc returns a freed 32 MB block at once; after keep_freed_memory the
    process keeps it (for the next tile), and release_freed_memory hands it back."""
    out = run_python("""
        import numpy as np
        from healdust import runtime
        def rss_mb():
            return int([x for x in open("/proc/self/status") if x.startswith("VmRSS")][0].split()[1]) // 1024
        def freed_block_kept():
            a = np.ones(32 << 20, np.uint8)
            held = rss_mb()
            del a
            return rss_mb() > held - 16
        default_kept = freed_block_kept()
        assert runtime._glibc() is not None, "not glibc"
        assert runtime.keep_freed_memory()
        kept = freed_block_kept()
        before = rss_mb()
        assert runtime.release_freed_memory()
        print(default_kept, kept, before - rss_mb())
    """)
    default_kept, kept, given_back = out.split()
    assert default_kept == "False"
    assert kept == "True"
    assert int(given_back) >= 24
