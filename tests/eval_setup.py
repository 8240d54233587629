"""The tiny LLaVA checkpoint and image folder the fidelity and pio-tune tests share."""
from __future__ import annotations

import json
import shutil

from pio_kernels.eval.tasks.local import load_folder
from pio_kernels.eval.tiny import sample_images, write_checkpoint
from pio_kernels.eval.vlm import LocalVLM


def tiny_llava_and_images(root, prompts: list[tuple[str, str]] | None = None):
    """(checkpoint path, image folder, loaded fp32 model, the folder's samples) under ``root``:
    a tiny LLaVA-1.5 and matplotlib's sample images, with ``prompts`` ((image, prompt) pairs)
    written as the folder's ``prompts.jsonl`` when given (else each image gets the default)."""
    path = write_checkpoint(str(root / "llava"), "llava-1.5")
    folder = root / "images"
    folder.mkdir()
    for src in sample_images():
        shutil.copy(src, folder)
    if prompts is not None:
        with open(folder / "prompts.jsonl", "w") as f:
            for name, prompt in prompts:
                f.write(json.dumps({"image": name, "prompt": prompt}) + "\n")
    return path, str(folder), LocalVLM.load(path, dtype="float32"), load_folder(str(folder))
