"""healdust for Krita: "Heal dust (AI)" and "Heal dust with edited mask" under Tools ▸ Scripts.

The protocol travels with the plugin (``healdust_protocol`` inside this folder); pyzmq and
msgpack come from the system's Python packages or, when Krita's Python lacks them, from
``vendor/`` beside this file, filled by ``healdust install-plugin krita``.
"""

import os
import sys

_VENDOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor")
if os.path.isdir(_VENDOR) and _VENDOR not in sys.path:
    sys.path.insert(0, _VENDOR)

from krita import Krita  # noqa: E402

from .extension import HealdustExtension  # noqa: E402

Krita.instance().addExtension(HealdustExtension(Krita.instance()))
