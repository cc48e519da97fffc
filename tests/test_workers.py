"""The worker-process pool (healdust.workers): real processes over real pipes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from healdust.workers import WorkerPool

from .stress import alive, wait_gone

TARGET = "tests.test_workers:_task"


def _task(arg):
    """The workers' function in these tests: ("square", x), ("fail", msg), ("print", x)
    or ("pid", _)."""
    what, x = arg
    if what == "fail":
        raise ValueError(x)
    if what == "print":
        print("stray output", x)  # must not corrupt the result stream
        os.write(1, b"and straight to fd 1\n")
        return x
    if what == "pid":
        return os.getpid()
    if what == "slow":
        time.sleep(x)
        return x
    return x * x


@pytest.fixture
def pool():
    p = WorkerPool(TARGET, 2, depth=2)
    yield p
    p.close()


def test_every_task_comes_back_once(pool) -> None:
    items = [(i, ("square", np.arange(i, dtype=np.int64))) for i in range(50)]
    got = dict(pool.map_unordered(items))
    assert sorted(got) == list(range(50))
    assert all(np.array_equal(got[i], np.arange(i) ** 2) for i in range(50))
    pids = {v for _, v in pool.map_unordered((i, ("pid", None)) for i in range(20))}
    assert pids <= set(pool.pids) and os.getpid() not in pids


def test_an_exception_in_a_worker_is_raised_in_the_caller_and_the_pool_goes_on(pool) -> None:
    items = [(0, ("square", 3)), (1, ("fail", "no room for this piece")), (2, ("square", 4))]
    with pytest.raises(ValueError, match="no room for this piece"):
        list(pool.map_unordered(items))
    assert not pool.broken
    assert dict(pool.map_unordered([(0, ("square", 5)), (1, ("print", 7))])) == {0: 25, 1: 7}


def test_cancel_stops_handing_out_tasks(pool) -> None:
    calls = []

    class Stop(Exception):
        pass

    def check() -> None:
        calls.append(1)
        if len(calls) > 3:
            raise Stop

    with pytest.raises(Stop):
        list(pool.map_unordered(((i, ("square", i)) for i in range(100)), check))
    assert len(calls) == 4
    assert dict(pool.map_unordered([(0, ("square", 6))])) == {0: 36}


def test_a_killed_worker_loses_no_task(pool) -> None:
    victim = pool.pids[0]
    items = [(0, ("slow", 0.5))] + [(i, ("square", i)) for i in range(1, 40)]
    done = {}
    for key, value in pool.map_unordered(items):
        done[key] = value
        if len(done) == 1:
            os.kill(victim, signal.SIGKILL)
    assert done == {0: 0.5, **{i: i * i for i in range(1, 40)}}
    assert pool.broken


def test_workers_end_with_a_killed_parent_and_never_import_its_main_script(tmp_path: Path) -> None:
    """The parent script has no ``__main__`` guard (multiprocessing's spawn would run it
    again in every worker); it counts its own imports, starts a pool, prints the
    workers' pids and waits to be killed."""
    marks = tmp_path / "imports"
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        with open({str(marks)!r}, "a") as f:
            f.write("x")
        from healdust.workers import WorkerPool
        pool = WorkerPool({TARGET!r}, 2)
        print(" ".join(map(str, pool.pids)), flush=True)
        time.sleep(60)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    assert wait_gone(pids), "workers outlived their killed parent"
    assert marks.read_text() == "x", "the parent's main script was imported again"
