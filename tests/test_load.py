"""Many clients at once, and a queue pushed past its limits (the drivers are in tests/stress.py).

8 clients in threads, one socket each, 25 jobs each of mixed sizes (inpaint, detect and
heal with the base model, 32-256 px): every job gets exactly one final reply, nothing comes
for ids never sent, cancels are honoured per SPEC §7, the queue is round-robin across
clients, and the daemon's memory stays bounded. Then the queue is flooded past its limits
(16 per client, 64 in all): a clear ``busy`` error for every job past them, and everything
accepted drains.
"""

from __future__ import annotations

import time
from collections import Counter

from healdust.protocol import ImageDesc
from healdust.protocol.client import Client

from .stress import flood, load_image, percentiles, proc_status_kb, run_load

CLIENTS, JOBS = 8, 25
LOAD_RSS_BOUND_KB = 500 * 1024     # peak over the idle daemon: ≤ 256 px jobs queued, and a fine-tune's working set


def test_eight_clients_25_jobs_each_exactly_one_final_reply_fair_and_cancellable(daemon):
    rep = run_load(daemon.endpoint, CLIENTS, JOBS, seed=0, pid=daemon.proc.pid)
    lat = percentiles(rep.latencies())
    cancels = percentiles(rep.cancel_latencies())
    summary = (f"{len(rep.jobs)} jobs in {rep.seconds:.1f} s: {rep.count('result')} results, "
               f"{rep.count('cancelled')} cancelled, {rep.count('error')} errors; latency "
               + ", ".join(f"{k} {v:.2f} s" for k, v in lat.items())
               + f"; running cancels took at most {cancels.get('max', 0):.2f} s; fairness spread {rep.max_spread}; "
               f"blocker {rep.blocker}; daemon RSS {rep.base_rss_kb / 1024:.0f} MB idle, "
               f"{rep.peak_rss_kb / 1024:.0f} MB peak")
    print(summary)
    assert not rep.problems, f"{summary}\n{len(rep.problems)} problems:\n" + "\n".join(rep.problems[:20])
    assert len(rep.jobs) == CLIENTS * JOBS
    # the plan: per client one fine-tune cancelled while running, two jobs cancelled right after sending
    running = [j for j in rep.jobs if j.cancel == "running"]
    queued = [j for j in rep.jobs if j.cancel == "queued"]
    assert len(running) == CLIENTS and all(j.final_type == "cancelled" for j in running)
    assert len(queued) == 2 * CLIENTS
    # a job cancelled right after it was sent is normally still queued; it may have finished first
    assert sum(j.final_type == "cancelled" for j in queued) >= CLIENTS, [j.final_type for j in queued]
    assert rep.count("result") + rep.count("cancelled") == CLIENTS * JOBS
    assert rep.max_spread <= 4     # round-robin: 1, plus the jitter of 8 threads timing their replies
    assert rep.peak_rss_kb - rep.base_rss_kb < LOAD_RSS_BOUND_KB, summary
    with Client(daemon.endpoint) as c:
        s = c.call("status").header
    assert s["queue"] == 0 and s["running"] is None


def test_flood_past_the_queue_limits_gets_busy_then_drains(daemon):
    with Client(daemon.endpoint) as c:
        limits = c.hello()["limits"]
    rep = flood(daemon.endpoint, limits, pid=daemon.proc.pid)
    per, total = limits["max_queue_per_client"], limits["max_queue"]
    summary = (f"accepted {rep.accepted}, busy {rep.busy} ({sorted(rep.busy_messages)}), drained {rep.drained} "
               f"in {rep.drain_seconds:.1f} s ({rep.seconds:.1f} s in all); queue when full {rep.queue_when_full}; "
               f"drain order spread {rep.spread}; "
               f"RSS {rep.base_rss_kb / 1024:.0f} MB before, {rep.peak_rss_kb / 1024:.0f} MB peak with "
               f"{total} jobs of {rep.job_bytes / 1e6:.1f} MB queued")
    print(summary)
    assert not rep.problems, f"{summary}\n" + "\n".join(rep.problems[:20])
    assert rep.accepted == rep.drained == total
    assert rep.busy == 1 + 3            # the one past the per-client limit, three into the full queue
    assert per < total
    # memory bounded by the queue limit: the queued pixels (at most one copy more), plus the running job
    bound = total * rep.job_bytes * 2 + 100 * 1024 * 1024
    assert (rep.peak_rss_kb - rep.base_rss_kb) * 1024 < bound, summary
    assert daemon.alive()
    assert proc_status_kb(daemon.proc.pid) > 0


def test_a_cancel_answered_true_ends_the_job_cancelled(daemon):
    """SPEC §7: ``cancelled: true`` means the job was found and stopped, so its final reply is ``cancelled``.

    The cancel goes out the moment detection reports 1.0, while the worker still thresholds
    the map and packs the mask: the last moment a cancel can find the job running.
    """
    img = load_image(256, 1)[0]
    fields = {"image": ImageDesc.packed(256, 256, "RGB", "u8").to_dict()}
    seen: Counter = Counter()
    with Client(daemon.endpoint, timeout=60) as c:
        for _ in range(6):
            rid = c.submit("detect", fields, [img])
            cid = ack = final = None
            deadline = time.monotonic() + 60
            while final is None or (cid is not None and ack is None):
                assert time.monotonic() < deadline, "no final reply or no answer to the cancel"
                for ev in c.poll(0.5):
                    eid = ev.header.get("id")
                    if (eid == rid and ev.type == "progress" and ev.get("stage") == "detect"
                            and ev.get("fraction") == 1.0 and cid is None):
                        cid = c.submit("cancel", {"target": rid})
                    elif cid is not None and eid == cid:
                        ack = ev.get("cancelled")
                    elif eid == rid and ev.final:
                        final = ev.type
            seen[(ack, final)] += 1
    assert all(final == ("cancelled" if ack else "result") for ack, final in seen), \
        f"(cancel answer, final reply) → times: {dict(seen)}"
