"""The window's LoRA list: the run-time LoRAs of the next run, each with its scale, picked from files or from the
names in ``--lora_dir``. A change costs no build: the next run re-creates only the sessions the LoRAs touch."""

from __future__ import annotations

import math
from pathlib import Path

from sd_utils.errors import UserInputError
from sd_utils.generation.lora_tags import lora_names

DEFAULT_SCALE = "1.0"


def read_scale(text: str, what: str) -> float:
    """A scale box's text as a number from -10 to 10 (the command line's range); one line naming it otherwise."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        raise UserInputError(f"{what} scale {text!r} is not a number; give e.g. 0.8") from None
    if not (math.isfinite(value) and -10 <= value <= 10):
        raise UserInputError(f"{what} scale {text}: give a scale from -10 to 10")
    return value


class LoraList:
    """A list of (file, scale), a scale box, a list of the ``--lora_dir`` names, and Add file… / Add / Remove."""

    def __init__(self, parent, *, row: int, columns: int, loras, lora_dirs) -> None:
        import tkinter
        from tkinter import ttk

        self.loras: list[tuple[Path, float]] = []
        frame = ttk.Frame(parent)
        frame.grid(row=row, column=0, columnspan=columns, sticky="w", pady=4)
        ttk.Label(frame, text="LoRAs").grid(row=0, column=0, sticky="nw", padx=(0, 4))
        self.listbox = tkinter.Listbox(frame, height=3, width=40, exportselection=False)
        self.listbox.grid(row=0, column=1, rowspan=2, sticky="w")
        controls = ttk.Frame(frame)
        controls.grid(row=0, column=2, sticky="nw", padx=4)
        self.names = lora_names(lora_dirs)
        self.name = ttk.Combobox(controls, values=sorted(self.names), width=24, state="readonly")
        self.name.grid(row=0, column=0, columnspan=2, sticky="w")
        ttk.Label(controls, text="Scale").grid(row=1, column=0, sticky="w")
        self.scale = ttk.Entry(controls, width=6)
        self.scale.insert(0, DEFAULT_SCALE)
        self.scale.grid(row=1, column=1, sticky="w")
        buttons = ttk.Frame(controls)
        buttons.grid(row=2, column=0, columnspan=2, sticky="w")
        ttk.Button(buttons, text="Add", command=self.add_named).grid(row=0, column=0)
        ttk.Button(buttons, text="Add file…", command=self.add_file).grid(row=0, column=1)
        ttk.Button(buttons, text="Remove", command=self.remove_selected).grid(row=0, column=2)
        for path, scale in loras:
            self.add(Path(path), scale)

    def _scale(self) -> float:
        return read_scale(self.scale.get(), "LoRA")

    def add(self, path: Path, scale: float) -> None:
        """Add ``path`` at ``scale`` (a LoRA already in the list gets the new scale)."""
        self.loras = [(other, value) for other, value in self.loras if other != path] + [(path, scale)]
        self._show()

    def add_named(self) -> None:
        """Add: the ``--lora_dir`` name picked in the list, at the scale in the box."""
        if self.name.get():
            self.add(self.names[self.name.get()], self._scale())

    def add_file(self) -> None:
        """Add file…: a ``.safetensors`` picked in a file dialog, at the scale in the box."""
        from tkinter import filedialog

        picked = filedialog.askopenfilename(
            title="A LoRA", filetypes=[("LoRA", "*.safetensors"), ("All files", "*")], parent=self.listbox
        )
        if picked:
            self.add(Path(picked), self._scale())

    def remove_selected(self) -> None:
        for index in sorted(self.listbox.curselection(), reverse=True):
            del self.loras[index]
        self._show()

    def clear(self) -> None:
        self.loras = []
        self._show()

    def _show(self) -> None:
        self.listbox.delete(0, "end")
        for path, scale in self.loras:
            self.listbox.insert("end", f"{path.stem}  x{scale:g}")

    def selected(self) -> tuple[tuple[Path, float], ...]:
        """The LoRAs of the next run, for ``Options.lora``."""
        return tuple(self.loras)
