"""The window's ControlNet rows (shown when the command line gave ``--controlnet``): per ControlNet, its scale, its
control image (Image… picks another) and a preview of the map the ControlNet reads (after ``--control_preprocess``).
The next run uses them; the ControlNets themselves stay those of the command line (they are built for it)."""

from __future__ import annotations

from pathlib import Path

from sd_utils.errors import UserInputError
from sd_utils.generation.control_images import load_control_image
from sd_utils.ui.lora_list import read_scale

PREVIEW = 96


class ControlPanel:
    def __init__(self, parent, *, row: int, columns: int, options) -> None:
        from tkinter import ttk

        self.options = options
        self.images: list[Path] = [Path(path) for path in options.control_image]
        self.scales: list = []
        self.previews: list = []
        self._photos: list = [None] * len(self.images)  # PhotoImages must stay referenced while shown
        frame = ttk.Frame(parent)
        frame.grid(row=row, column=0, columnspan=columns, sticky="w", pady=4)
        for index, (given, scale) in enumerate(options.controlnet):
            ttk.Label(frame, text=f"ControlNet {Path(given).name}").grid(row=index, column=0, sticky="w")
            ttk.Label(frame, text="Scale").grid(row=index, column=1, padx=(6, 2))
            entry = ttk.Entry(frame, width=6)
            entry.insert(0, f"{scale:g}")
            entry.grid(row=index, column=2)
            self.scales.append(entry)
            ttk.Button(frame, text="Image…", command=lambda index=index: self.pick(index)).grid(row=index, column=3)
            preview = ttk.Label(frame)
            preview.grid(row=index, column=4, padx=4)
            self.previews.append(preview)
            self.show(index)

    def pick(self, index: int) -> None:
        """Image…: another control image for ControlNet ``index`` (a file dialog)."""
        from tkinter import filedialog

        picked = filedialog.askopenfilename(
            title="A control image", filetypes=[("Images", "*.png *.jpg *.jpeg *.webp"), ("All files", "*")]
        )
        if picked:
            self.set_image(index, Path(picked))

    def set_image(self, index: int, path: Path) -> None:
        self.images[index] = path
        self.show(index)

    def show(self, index: int) -> None:
        """The preview of ControlNet ``index``'s map, as the run will make it (a square of the image's size)."""
        from PIL import ImageTk

        options = self.options
        try:
            made = load_control_image(
                self.images[index],
                size=(PREVIEW, PREVIEW),
                preprocess=options.control_preprocess,
                low=options.canny_low,
                high=options.canny_high,
            )
        except UserInputError as error:
            self.previews[index].configure(image="", text=str(error)[:60])
            return
        self._photos[index] = ImageTk.PhotoImage(made.image, master=self.previews[index])
        self.previews[index].configure(image=self._photos[index], text="")

    def changes(self) -> dict:
        """The options of the next run: each ControlNet at the scale in its box, with its image."""
        nets = []
        for (given, _), entry in zip(self.options.controlnet, self.scales, strict=True):
            nets.append((given, read_scale(entry.get(), "ControlNet")))
        return {"controlnet": tuple(nets), "control_image": tuple(self.images)}
