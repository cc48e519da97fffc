"""A stand-in for ``healdust serve`` inside the GIMP chroot (which has no healdust).

The plug-in starts it as the installed serve command when no daemon answers, appending
``--endpoint URL``. It binds there and relays every message to the real daemon on the
host (``--upstream``), writing each request's header (markers included, pixels not) to
``--log`` as JSON lines, so the tests see exactly what the plug-in sent. Both sides speak ZeroMQ PLAIN, as the real
daemon does on loopback: the front demands it (a plug-in without the token gets nothing),
the back presents the daemon's token (``--token``) and checks that the plug-in presents the same one. Runs with the
chroot's python3 (msgpack and pyzmq from Debian); exits after ``--lifetime`` seconds.
"""

import argparse
import json
import os
import time

import msgpack
import zmq
from zmq.auth.thread import ThreadAuthenticator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--pidfile", required=True)
    ap.add_argument("--lifetime", type=float, default=300.0)
    ap.add_argument("--token", required=True, help="the daemon's keys/local.token")
    ap.add_argument("--endpoint", required=True)
    args = ap.parse_args()
    with open(args.token, "rb") as f:
        token = f.read().strip()
    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)  # PLAIN needs a ZAP handler: this one checks the token
    auth.start()
    auth.configure_plain(domain="healdust", passwords={"healdust": token.decode()})
    front = ctx.socket(zmq.ROUTER)
    front.setsockopt(zmq.LINGER, 0)
    front.plain_server = True
    front.zap_domain = b"healdust"
    front.bind(args.endpoint)
    with open(args.pidfile, "w") as f:
        f.write(str(os.getpid()))
    # one upstream DEALER per plug-in client, so the daemon sees each as its own client
    upstream: dict[bytes, zmq.Socket] = {}
    owner: dict[zmq.Socket, bytes] = {}
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    end = time.monotonic() + args.lifetime
    with open(args.log, "a", encoding="utf-8") as log:
        while time.monotonic() < end:
            for sock, _ in poller.poll(500):
                frames = sock.recv_multipart()
                if sock is not front:
                    front.send_multipart([owner[sock], *frames])
                    continue
                ident, msg = frames[0], frames[1:]
                try:
                    header = msgpack.unpackb(msg[0], raw=False)
                    log.write(json.dumps({"header": header, "buffers": [len(b) for b in msg[1:]]},
                                         default=str) + "\n")
                except Exception as e:  # log what cannot be read, relay it anyway
                    log.write(json.dumps({"unreadable": repr(e)}) + "\n")
                log.flush()
                if ident not in upstream:
                    back = ctx.socket(zmq.DEALER)
                    back.setsockopt(zmq.LINGER, 0)
                    back.plain_username, back.plain_password = b"healdust", token
                    back.connect(args.upstream)
                    upstream[ident], owner[back] = back, ident
                    poller.register(back, zmq.POLLIN)
                upstream[ident].send_multipart(msg)

if __name__ == "__main__":
    main()
