"""The GIMP-independent parts of the healdust GIMP 3 plug-in.

``healdust.py`` beside this package wires GIMP (procedures, pixels, layers, undo, progress);
the modules here only need the standard library (and, for ``link``, the bundled protocol
with msgpack and pyzmq), so the tests can run them without GIMP:

- ``markers``: dust markers from path strokes and from the selection's separate areas;
- ``pixels``:  which Babl encoding and wire sample type fit an image's precision; masks;
- ``link``:    the plug-in's settings, finding or starting the daemon, running a job.
"""
