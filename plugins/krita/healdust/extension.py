"""Wires the two menu actions (Tools ▸ Scripts) to the jobs; nothing else lives here."""

from __future__ import annotations

from krita import Extension

ACTIONS = (
    ("healdust_heal", "Heal dust (AI)", "HealJob"),
    ("healdust_heal_mask", "Heal dust with edited mask", "MaskHealJob"),
)


class HealdustExtension(Extension):
    def setup(self):
        pass

    def createActions(self, window):
        for action_id, text, job_name in ACTIONS:
            action = window.createAction(action_id, text, "tools/scripts")
            action.triggered.connect(lambda _checked=False, name=job_name: _start(name))


def _start(job_name: str) -> None:
    # Imported on use: a missing piece (pyzmq, the bundled protocol) becomes a message, not a
    # plugin that fails to load.
    try:
        from . import job
    except Exception as e:  # noqa: BLE001 - shown to the user
        from PyQt5.QtWidgets import QMessageBox

        QMessageBox.warning(None, "Heal dust (AI)", f"The healdust plugin cannot start: {e}. "
                            "Reinstall it with `healdust install-plugin krita`.")
        return
    job.run(getattr(job, job_name))
