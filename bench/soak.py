"""Soak: fuzz, load and flood one real daemon, and print the figures.

    python bench/soak.py [--fuzz 10000] [--clients 8 --jobs 25] [--seed S] [--sections fuzz,load,flood]

One ``healdust serve --device cpu`` process in a fresh HEALDUST_HOME takes, in turn:

* fuzz: malformed, mutated and hostile messages (tests/stress.py ``MessageFuzzer``), a
  hello after every 50; how many got a reply, how many were ignored, what the replies were,
  the daemon's memory after a warm-up batch and after the run;
* load: ``--clients`` clients in threads, ``--jobs`` mixed small jobs each, some cancelled
  while queued or running; latency from submit to final reply, fairness, peak memory;
* flood: the queue filled past its limits; the ``busy`` replies, then the drain;
* kills: other daemons SIGKILLed ``--kills`` times at random moments while saving a model.

A daemon that dies or stops answering is restarted and counted (it must be 0). Every
section's checks are the tests' (tests/test_fuzz.py, tests/test_load.py); their problems
are printed and make the exit status 1. A section is a function ``(soak, args) -> rows``
listed in SECTIONS: add one there.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from healdust.protocol import Limits  # noqa: E402
from healdust.protocol.client import Client  # noqa: E402
from tests import stress  # noqa: E402
from tests.conftest import DaemonProcess  # noqa: E402

Rows = list[tuple[str, str]]


class Soak:
    """The daemon under test, restarted (and counted) when it goes away."""

    def __init__(self, serve_args: tuple = ()):
        self.home = Path(tempfile.mkdtemp(prefix="healdust-soak-"))
        self.serve_args = serve_args
        self.restarts = 0
        self.peak_kb = 0          # VmHWM over every daemon process of the run
        self.problems: list[str] = []
        self.daemon = DaemonProcess(self.home, args=serve_args)

    @property
    def endpoint(self) -> str:
        return self.daemon.endpoint

    @property
    def pid(self) -> int:
        return self.daemon.proc.pid

    def client(self, **kw) -> Client:
        return Client(self.endpoint, home=self.home, **kw)

    def note_peak(self) -> int:
        self.peak_kb = max(self.peak_kb, stress.proc_status_kb(self.pid, "VmHWM"))
        return self.peak_kb

    def answers(self) -> bool:
        if not self.daemon.alive():
            return False
        with self.client() as c:
            try:
                return c.hello(timeout=10)["protocol"] == 1
            except Exception:
                return False

    def ensure(self, why: str = "") -> None:
        """Restart the daemon if it is gone or wedged (counted: a soak must need none)."""
        if self.answers():
            return
        self.note_peak()
        self.restarts += 1
        self.problems.append(f"daemon restarted ({why or 'it stopped answering'}); its stderr ended: "
                             + "".join(self.daemon.stderr_lines[-5:]).strip()[-500:])
        try:
            self.daemon.stop(timeout=5)
        except Exception:
            pass
        self.daemon = DaemonProcess(self.home, endpoint=self.daemon.endpoint, args=self.serve_args)

    def close(self) -> int:
        self.note_peak()
        return self.daemon.stop()


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def secs(d: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items()) + " s" if d else "-"


# -- sections ----------------------------------------------------------------------------

def section_fuzz(soak: Soak, args) -> Rows:
    seed_blob = stress.make_seed_model(soak.home)
    hwm_start = stress.proc_status_kb(soak.pid, "VmHWM")
    with soak.client() as c:
        limits = Limits(**c.hello()["limits"])
    fz = stress.MessageFuzzer(args.seed, seed_blob, limits)
    warm = stress.fuzz_daemon(soak.endpoint, min(1000, args.fuzz), args.seed, fuzzer=fz, home=soak.home)
    rss_warm = stress.proc_status_kb(soak.pid)
    rep = stress.FuzzReport(args.seed)
    while rep.sent < args.fuzz:
        part = stress.fuzz_daemon(soak.endpoint, args.fuzz - rep.sent, args.seed, fuzzer=fz, home=soak.home)
        rep.merge(part)
        if part.daemon_lost or not soak.daemon.alive():
            soak.ensure(f"fuzz, seed {args.seed}, after message #{fz.count}")
    rss_after = stress.proc_status_kb(soak.pid)
    hwm_after = stress.proc_status_kb(soak.pid, "VmHWM")
    problems = warm.problems + rep.problems
    soak.problems += problems
    soak.note_peak()
    codes = ", ".join(f"{k} {v}" for k, v in rep.codes.most_common())
    return [
        ("seed", f"{args.seed}"),
        ("messages fuzzed", f"{rep.sent} (+ {warm.sent} warm-up) in {rep.seconds:.1f} s, "
                            f"{rep.sent / max(rep.seconds, 1e-9):.0f}/s"),
        ("got their one reply", f"{rep.answered}"),
        ("ignored", f"{rep.ignored}"),
        ("replies", codes),
        ("tiny jobs among them", f"{rep.jobs_run} ({rep.jobs_cancelled} cancelled when their batch was done)"),
        ("hello between batches", f"{rep.hellos} answered"),
        ("daemon RSS", f"{mb(rss_warm)} after the warm-up, {mb(rss_after)} after "
                       f"({(rss_after - rss_warm) / 1024:+.0f} MB); peak (VmHWM) {mb(hwm_start)} before the "
                       f"fuzz, {mb(hwm_after)} after"),
        ("problems", f"{len(problems)}" + "".join(f"\n    {p[:300]}" for p in problems[:10])),
    ]


def section_load(soak: Soak, args) -> Rows:
    soak.ensure("before load")
    rep = stress.run_load(soak.endpoint, args.clients, args.jobs, seed=args.seed, pid=soak.pid, home=soak.home)
    soak.problems += rep.problems
    soak.note_peak()
    running = [j for j in rep.jobs if j.cancel == "running"]
    queued = [j for j in rep.jobs if j.cancel == "queued"]
    return [
        ("jobs", f"{len(rep.jobs)} ({args.clients} clients x {args.jobs}, 32-256 px inpaint/detect/heal) "
                 f"in {rep.seconds:.1f} s"),
        ("final replies", f"{rep.count('result')} result, {rep.count('cancelled')} cancelled, "
                          f"{rep.count('error')} error; {sum(len(j.finals) != 1 for j in rep.jobs)} jobs without "
                          f"exactly one; {len(rep.strays)} events for ids never sent"),
        ("latency, submit to result", secs(stress.percentiles(rep.latencies()))),
        ("jobs cancelled", f"{len(queued)} right after sending ({sum(j.final_type == 'cancelled' for j in queued)} "
                           f"ended cancelled, the rest had finished), {len(running)} while fine-tuning "
                           f"({sum(j.final_type == 'cancelled' for j in running)} cancelled, "
                           f"within {secs(stress.percentiles(rep.cancel_latencies()))})"),
        ("busy replies", f"{sum(1 for j in rep.jobs for e in j.events if e[2].get('code') == 'busy')}"),
        ("fairness", f"at most {rep.max_spread} job(s) between two clients while both had work queued"),
        ("daemon RSS", f"{mb(rep.base_rss_kb)} idle, {mb(rep.peak_rss_kb)} peak under load"),
        ("problems", f"{len(rep.problems)}" + "".join(f"\n    {p[:300]}" for p in rep.problems[:10])),
    ]


def section_flood(soak: Soak, args) -> Rows:
    soak.ensure("before flood")
    with soak.client() as c:
        limits = c.hello()["limits"]
    rep = stress.flood(soak.endpoint, limits, pid=soak.pid, home=soak.home)
    soak.problems += rep.problems
    soak.note_peak()
    return [
        ("limits", f"{limits['max_queue']} jobs queued in all, {limits['max_queue_per_client']} per client"),
        ("accepted", f"{rep.accepted} jobs of {rep.job_bytes / 1e6:.1f} MB "
                     f"(hello said queue {rep.queue_when_full} when full)"),
        ("busy replies", f"{rep.busy}: " + " / ".join(sorted(rep.busy_messages))),
        ("drained", f"{rep.drained} in {rep.drain_seconds:.1f} s, round-robin spread {rep.spread}"),
        ("daemon RSS", f"{mb(rep.base_rss_kb)} before, {mb(rep.peak_rss_kb)} peak with the queue full"),
        ("problems", f"{len(rep.problems)}" + "".join(f"\n    {p[:300]}" for p in rep.problems[:10])),
    ]


def section_kills(soak: Soak, args) -> Rows:
    """Daemons of their own (in a separate home), SIGKILLed at random moments of saving."""
    t = time.monotonic()
    try:
        fig = stress.sigkill_during_saves(Path(tempfile.mkdtemp(prefix="healdust-kills-")), args.kills,
                                          seed=args.seed)
    except AssertionError as e:
        soak.problems.append(f"kills: {e}")
        return [("failed", str(e))]
    return [
        ("SIGKILLs while saving", f"{fig['kills']} survived: every time the model file was one version or "
                                  f"the other, whole ({fig['ended_as']['a']} / {fig['ended_as']['b']})"),
        ("saves interrupted or done", f"{fig['saves']} models.import saves in {time.monotonic() - t:.0f} s; "
                                      f"{fig['midway']} kills caught one midway (a temporary file was left)"),
        ("after a restart", "the model loads and no temporary file is left"),
    ]


# name → section; main() runs the ones asked for, in this order
SECTIONS: dict[str, Callable[[Soak, argparse.Namespace], Rows]] = {
    "fuzz": section_fuzz,
    "load": section_load,
    "flood": section_flood,
    "kills": section_kills,
}


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{model}, {os.cpu_count()} cores ({usable} usable){mem}; {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fuzz", type=int, default=10_000, help="fuzz messages (after a warm-up of 1000)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=25, help="jobs per client")
    ap.add_argument("--kills", type=int, default=25, help="SIGKILLs of a daemon in the middle of saving")
    ap.add_argument("--seed", type=int, default=None, help="fuzz and load seed (default: random, printed)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra argument for `healdust serve` (repeat), e.g. --serve-arg=--max-queue=32")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")

    print(f"healdust soak on {machine()}")
    t0 = time.monotonic()
    soak = Soak(tuple(args.serve_arg))
    print(f"daemon: {soak.endpoint}, HEALDUST_HOME {soak.home}, seed {args.seed}")
    try:
        for name in wanted:
            t = time.monotonic()
            try:
                rows = SECTIONS[name](soak, args)
            except Exception as e:  # a section that breaks is a finding; the others still run
                soak.problems.append(f"{name}: {type(e).__name__}: {e}")
                rows = [("failed", f"{type(e).__name__}: {e}")]
            print(f"\n## {name} ({time.monotonic() - t:.0f} s)")
            width = max(len(k) for k, _ in rows)
            for k, v in rows:
                print(f"  {k:<{width}}  {v}")
            sys.stdout.flush()
        soak.ensure("at the end")
    finally:
        status = soak.close()
    print(f"\n## daemon\n  restarts needed   {soak.restarts}\n  peak memory       {mb(soak.peak_kb)} (VmHWM)\n"
          f"  clean shutdown    {'yes' if status == 0 else f'no (exit status {status})'}\n"
          f"  problems          {len(soak.problems)}\n  wall time         {time.monotonic() - t0:.0f} s")
    return 0 if not soak.problems and not soak.restarts and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
