"""Inside real Krita: no daemon at the endpoint, then a serve command that works.

1. ``dead``: the installed serve command fails at once → the plugin reports why, quickly.
2. ``autostart``: Krita's setting points at a working serve command → the plugin starts the
   daemon in the background, waits for its hello, and heals an edited mask.
3. ``vanished``: a daemon that dies in the middle of the job → the plugin says so at once
   and leaves the document as it was.
"""

import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kit  # noqa: E402
from kit import ARGS, RESULTS, K  # noqa: E402
from PyQt5.QtWidgets import QApplication  # noqa: E402

os.environ["HEALDUST_KRITA_NONINTERACTIVE"] = "1"
K.writeSetting("healdust", "serve_command", "")
doc = kit.new_doc(64, 48, "RGBA", "U8", name="connect")
src = doc.topLevelNodes()[0]
src.setPixelData(bytes([90, 120, 150, 255]) * (64 * 48), 0, 0, 64, 48)
mask_layer = doc.createNode("Dust mask", "paintlayer")
doc.rootNode().addChildNode(mask_layer, src)
spot = bytearray(64 * 48 * 4)
for y in range(20, 24):
    for x in range(30, 34):
        i = (y * 64 + x) * 4
        spot[i:i + 4] = b"\xff\xff\xff\xff"
mask_layer.setPixelData(bytes(spot), 0, 0, 64, 48)
doc.setActiveNode(src)


def run(name, action, timeout):
    kit.log("step", name)
    try:
        t = time.monotonic()
        layers_before = kit.layer_names(doc)
        # count event-loop turns: a frozen UI thread would turn it only a few times
        turns = [0]
        job = kit.plugin_job()
        before = len(job.HISTORY)
        K.action(action).trigger()
        while len(job.HISTORY) == before:
            if time.monotonic() - t > timeout:
                raise TimeoutError(f"{action} did not end within {timeout} s")
            QApplication.processEvents()
            turns[0] += 1
            time.sleep(0.005)
        RESULTS["steps"][name] = {"record": dict(job.HISTORY[-1]), "seconds": time.monotonic() - t,
                                  "event_loop_turns": turns[0], "layers_before": layers_before,
                                  "layers": kit.layer_names(doc),
                                  "messages": list(kit.plugin_module("ui").MESSAGES)}
    except Exception:
        RESULTS["steps"][name] = {"error": traceback.format_exc()}
    kit.save_results()


run("dead", "healdust_heal_mask", 60)
K.writeSetting("healdust", "serve_command", json.dumps(ARGS["good_serve_command"]))
run("autostart", "healdust_heal_mask", 180)
K.writeSetting("healdust", "serve_command", "")
K.writeSetting("healdust", "endpoint", ARGS["vanishing_endpoint"])
run("vanished", "healdust_heal_mask", 60)
K.writeSetting("healdust", "endpoint", "")
kit.save_results()
