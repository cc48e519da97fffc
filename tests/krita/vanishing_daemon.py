"""A stand-in daemon that dies in the middle of a job (for the Krita plug-in's test).

    python vanishing_daemon.py ipc:///path/sock

Answers ``hello`` like the daemon, and on the first job sends one progress event, then
exits at once without closing anything, as a daemon killed mid-job would. ``ipc://``, so
no token is needed; the process's exit drops the connection all the same.
"""

import os
import sys
import time

import msgpack
import zmq

endpoint = sys.argv[1]
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(endpoint)
print("ready", flush=True)
while True:
    ident, head, *_ = sock.recv_multipart()
    h = msgpack.unpackb(head)
    if h.get("type") == "hello":
        sock.send_multipart([ident, msgpack.packb({"v": 1, "type": "result", "id": h["id"], "protocol": 1,
                                                   "server": "vanishing", "device": "cpu",
                                                   "models_loaded": ["base"], "queue": 0})])
    elif h.get("type") in ("heal", "detect", "inpaint"):
        sock.send_multipart([ident, msgpack.packb({"v": 1, "type": "progress", "id": h["id"],
                                                   "stage": "heal", "fraction": 0.1})])
        time.sleep(0.3)
        os._exit(0)
