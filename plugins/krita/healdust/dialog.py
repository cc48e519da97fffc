"""The "Heal dust (AI)" dialog: model, transfer/scratch, sensitivity, save-as name."""

from __future__ import annotations

import re

from PyQt5.QtCore import QRegularExpression, Qt
from PyQt5.QtGui import QRegularExpressionValidator
from PyQt5.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QRadioButton,
    QSlider,
    QVBoxLayout,
)

from .settings import HealOptions, preselect_model

MODEL_NAME = r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,63}"  # SPEC.md §4


def _camera_text(camera) -> str:
    if not isinstance(camera, dict):
        return ""
    return " ".join(str(camera[k]) for k in ("make", "model") if camera.get(k))


def suggested_name(camera: dict | None) -> str:
    text = _camera_text(camera)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:64] if text else ""


class HealDialog(QDialog):
    def __init__(self, parent, options: HealOptions, models: list[dict], marker_summary: str,
                 has_markers: bool, camera: dict | None):
        super().__init__(parent)
        self.setWindowTitle("Heal dust (AI)")
        self._has_markers = has_markers
        layout = QVBoxLayout(self)
        info = QLabel(marker_summary)
        info.setWordWrap(True)
        layout.addWidget(info)
        form = QFormLayout()
        layout.addLayout(form)

        self.model = QComboBox()
        self.model.addItem("Base model", "")
        for m in sorted(models, key=lambda m: str(m.get("created") or ""), reverse=True):
            label = str(m.get("name"))
            made = str(m.get("created") or "")[:10]
            extra = ", ".join(t for t in (_camera_text(m.get("camera")), made) if t)
            self.model.addItem(f"{label} ({extra})" if extra else label, label)
        chosen = preselect_model(models, camera, options.model)
        self.model.setCurrentIndex(max(0, self.model.findData(chosen)))
        form.addRow("Model:", self.model)

        self.transfer = QRadioButton("Transfer: fine-tune the decoder (few markers, fast)")
        self.scratch = QRadioButton("Scratch: train every layer")
        group = QButtonGroup(self)
        group.addButton(self.transfer)
        group.addButton(self.scratch)
        (self.scratch if options.mode == "scratch" else self.transfer).setChecked(True)
        modes = QVBoxLayout()
        modes.addWidget(self.transfer)
        modes.addWidget(self.scratch)
        form.addRow("Learning:", modes)

        self.auto = QCheckBox("Automatic")
        self.auto.setChecked(options.auto_threshold)
        self.sensitivity = QSlider(Qt.Horizontal)
        self.sensitivity.setRange(0, 100)
        self.sensitivity.setValue(options.sensitivity)
        self.sensitivity.setEnabled(not options.auto_threshold)
        self.auto.toggled.connect(lambda on: self.sensitivity.setEnabled(not on))
        row = QHBoxLayout()
        row.addWidget(self.auto)
        row.addWidget(self.sensitivity)
        form.addRow("Sensitivity:", row)

        self.save_as = QLineEdit(options.save_as or suggested_name(camera))
        self.save_as.setPlaceholderText("do not save")
        self.save_as.setValidator(QRegularExpressionValidator(QRegularExpression(MODEL_NAME), self.save_as))
        form.addRow("Save model as:", self.save_as)

        for w in (self.transfer, self.scratch, self.save_as):
            w.setEnabled(has_markers)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.button(QDialogButtonBox.Ok).setText("Heal")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

    def options(self) -> HealOptions:
        return HealOptions(model=self.model.currentData() or "",
                           mode="scratch" if self.scratch.isChecked() else "transfer",
                           auto_threshold=self.auto.isChecked(),
                           sensitivity=self.sensitivity.value(),
                           save_as=self.save_as.text().strip())


def ask(parent, options: HealOptions, models: list[dict], marker_summary: str, has_markers: bool,
        camera: dict | None) -> HealOptions | None:
    """Show the dialog (modal; Qt keeps running the timers); None when the user cancels."""
    dlg = HealDialog(parent, options, models, marker_summary, has_markers, camera)
    try:
        return dlg.options() if dlg.exec_() == QDialog.Accepted else None
    finally:
        dlg.deleteLater()
