"""Speed and memory at full resolution.

    python bench/speed.py [--sizes 6,24,100] [--depths 8,16]

For each size and bit depth: detection and healing time per megapixel with the base model
(in-process), the same heal through a real daemon on loopback (the ratio of the two is the
transport overhead), the daemon's peak resident memory (VmHWM, one fresh daemon per image
size) and its healing worker processes' (the sum of each one's peak), and the fine-tune
time for 5 markers. ``--repeat N`` runs each job N times both ways, alternating, and
prints the fastest of each. Images are the bundled sample resized up,
with synthetic film dust (about 0.2 % of pixels).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

from healdust import synth
from healdust.demo import sample_path
from healdust.model.finetune import fine_tune
from healdust.model.infer import use_bf16
from healdust.pipeline import JobSpec, Pipeline
from healdust.protocol import ImageDesc
from healdust.protocol.client import Client
from healdust.runtime import keep_freed_memory


def image_shape(mp: float) -> tuple[int, int]:
    """(height, width) of ``make_image``'s 3:2 image of ``mp`` megapixels."""
    w = int(round((mp * 1e6 * 1.5) ** 0.5))
    return int(round(w / 1.5)), w


def make_image(mp: float, depth: int, seed: int = 0, truth: np.ndarray | None = None) -> np.ndarray:
    """The bundled sample scaled to ``mp`` megapixels with film dust; ``truth`` (bool,
    ``image_shape(mp)``), if given, receives the dust's mask."""
    photo = synth.load_photo(sample_path(), 4096).astype(np.float32) / 255
    h, w = image_shape(mp)
    img = cv2.resize(photo, (w, h), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(seed)
    # dust in a few hundred 512² windows, so making the image stays cheap
    for _ in range(int(mp * 12)):
        y, x = int(rng.integers(0, h - 512)), int(rng.integers(0, w - 512))
        win = np.ascontiguousarray(img[y:y + 512, x:x + 512])
        dmg = synth.add_film_damage(win, rng, None, count=3, grain=0.0)
        img[y:y + 512, x:x + 512] = dmg.image
        if truth is not None:
            truth[y:y + 512, x:x + 512] |= dmg.mask
    scale = 255 if depth == 8 else 65535
    return np.clip(np.rint(img * scale), 0, scale).astype(np.uint8 if depth == 8 else np.uint16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(home: str, device: str, precision: str, tile: int | None = None) -> tuple[subprocess.Popen, str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    p = subprocess.Popen([sys.executable, "-m", "healdust", "serve", "--endpoint", endpoint, "--device", device,
                          "--precision", precision, *(["--tile", str(tile)] if tile else [])],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=dict(os.environ, HEALDUST_HOME=home))
    assert p.stdout.readline().startswith("healdust ready")
    return p, endpoint


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (its healing workers)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="6,24")
    ap.add_argument("--depths", default="8,16")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="detection arithmetic (healdust serve --precision)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each job both ways, alternating; "
                    "the fastest of each is printed (shared VMs vary by 10-20 %% from run to run)")
    ap.add_argument("--tile", type=int, default=None, help="detection tile size (healdust serve --tile; "
                    "default: its default)")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as the daemon does (healdust.runtime), so in-process compares like with like
    sizes = [float(s) for s in args.sizes.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    pipe = Pipeline(args.device, precision=args.precision, **({"tile": args.tile} if args.tile else {}))
    cuda = pipe.device.type == "cuda"
    rows = []
    home = tempfile.mkdtemp(prefix="healdust-speed-")
    for mp in sizes:
        daemon, endpoint = start_daemon(home, args.device, args.precision, args.tile)
        try:
            for depth in depths:
                img = make_image(mp, depth)
                h, w = img.shape[:2]
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                desc = ImageDesc.packed(w, h, "RGB", "u8" if depth == 8 else "u16").to_dict()
                local, remote, best = float("inf"), float("inf"), None
                for _ in range(args.repeat):  # alternating, so a slow spell of a shared VM hits both
                    t = time.monotonic()
                    res = pipe.run(JobSpec("heal", img, "RGB"))
                    dt = time.monotonic() - t
                    if dt < local:
                        local, best = dt, res.seconds
                    with Client(endpoint, timeout=1800, home=home) as c:
                        t = time.monotonic()
                        ev = c.call("heal", {"image": desc}, [img])
                        remote = min(remote, time.monotonic() - t)
                    assert ev.get("spots") == res.spots
                gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
                rows.append((mp, depth, w * h / 1e6, best["detect"], best["heal"], local, remote,
                             peak_rss_mb(daemon.pid), sum(peak_rss_mb(c) for c in child_pids(daemon.pid)),
                             res.spots, gpu_mb))
                print(f"# {w}x{h} {depth}-bit done", file=sys.stderr)
                del img, res, ev
        finally:
            daemon.terminate()
            daemon.wait()
    img = make_image(6, 8, seed=1)
    n, _, st, cen = cv2.connectedComponentsWithStats((np.abs(img.astype(int) - cv2.medianBlur(img, 7)).max(2) > 60)
                                                     .astype(np.uint8))
    big = [i for i in range(1, n) if st[i, cv2.CC_STAT_AREA] >= 6][:5]
    dust = [(float(cen[i][0]), float(cen[i][1]), float(0.5 * np.hypot(st[i, 2], st[i, 3]) + 5)) for i in big]
    ft = fine_tune(pipe.base, img, "RGB", dust, device=pipe.device)

    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    arith = "bf16" if use_bf16(pipe.device, args.precision) else "fp32"
    print(f"\nSpeed on {cpu_name()} ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}, "
          f"{where}, precision {args.precision} ({arith}), tile {pipe.tile}; base model, no markers; "
          f"fastest of {args.repeat} run(s) each way\n")
    print("| image | depth | MP | detect s/MP | heal s/MP | in-process s | via daemon s | daemon overhead "
          "| daemon peak RSS MB | + workers MB |" + (" peak GPU MB (in-process) |" if cuda else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for mp, depth, real_mp, det, heal, local, remote, rss, workers_rss, _spots, gpu_mb in rows:
        print(f"| {mp:g} MP | {depth}-bit | {real_mp:.1f} | {det / real_mp:.2f} | {heal / real_mp:.3f} | "
              f"{local:.1f} | {remote:.1f} | {100 * (remote / local - 1):+.0f} % | {rss:.0f} | {workers_rss:.0f} |"
              + (f" {gpu_mb:.0f} |" if cuda else ""))
    print(f"\nfine-tune on {len(dust)} markers (transfer): {ft.seconds:.1f} s, {ft.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
