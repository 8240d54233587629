"""Local data for evaluation: a folder of images plus prompts, and lmms-eval tasks over it.

Folder format (read by :func:`load_folder`, used by ``pio-eval fidelity``, ``pio-tune`` and
``pio-eval make-task``):

* image files (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``, ``.gif``), and optionally
* ``prompts.jsonl``: one JSON object per line, ``{"image": "cat.jpg", "prompt": "What is
  shown?"}``, with optional ``"answer"`` (the reference answer) and ``"choices"`` (a list of
  options; ``answer`` is then one of them). ``image`` is relative to the folder; several lines
  may share an image.

Without ``prompts.jsonl`` every image gets the default prompt.

:func:`write_task` turns such samples into an lmms-eval task: a JSONL data file and a YAML
(``dataset_path: json``, ``dataset_kwargs: {data_files: {test: ...}}``) whose ``doc_to_visual``
and ``doc_to_text`` are the functions below. Generation tasks score ``exact_match`` (case and
punctuation ignored), multiple-choice tasks ``acc``. Run it with
``lmms-eval --model pio --include_path <folder> --tasks <name> ...``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

__all__ = ["DEFAULT_PROMPT", "Sample", "doc_to_text", "doc_to_visual", "load_folder", "write_task"]

DEFAULT_PROMPT = "Describe this image."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


@dataclass
class Sample:
    """One prompt about one image (``image`` an absolute path)."""

    image: str
    prompt: str
    answer: str | None = None
    choices: list[str] = field(default_factory=list)


def load_folder(folder: str, prompt: str = DEFAULT_PROMPT) -> list[Sample]:
    """The samples of a folder (see the module docstring), in file / line order.

    Raises:
        ValueError: no image, a ``prompts.jsonl`` line without ``image`` / ``prompt`` or naming a
            missing file, or an ``answer`` that is not one of its ``choices``.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"folder must be a directory of images, got {folder!r}")
    index = os.path.join(folder, "prompts.jsonl")
    samples = []
    if os.path.exists(index):
        with open(index) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "image" not in row or "prompt" not in row:
                    raise ValueError(f"{index}:{n}: each line needs 'image' and 'prompt', got {sorted(row)}")
                path = os.path.join(folder, row["image"])
                if not os.path.isfile(path):
                    raise ValueError(f"{index}:{n}: image {row['image']!r} not found in {folder}")
                choices = [str(c) for c in row.get("choices", [])]
                answer = None if row.get("answer") is None else str(row["answer"])
                if choices and answer is not None and answer not in choices:
                    raise ValueError(f"{index}:{n}: answer {answer!r} is not one of the choices {choices}")
                samples.append(Sample(path, str(row["prompt"]), answer, choices))
    else:
        for name in sorted(os.listdir(folder)):
            if name.lower().endswith(IMAGE_SUFFIXES):
                samples.append(Sample(os.path.join(folder, name), prompt))
    if not samples:
        raise ValueError(f"no image found in {folder} (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return samples


def doc_to_visual(doc: dict) -> list:
    """The document's image, as an RGB PIL image in a list."""
    from PIL import Image
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The document's question, between the optional ``pre_prompt`` / ``post_prompt``."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def _yaml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def write_task(folder: str, name: str, samples: list[Sample], *, multiple_choice: bool = False,
               max_new_tokens: int = 16) -> str:
    """Writes ``<folder>/<name>.jsonl`` and ``<folder>/<name>.yaml``; returns the YAML's path.

    Generation tasks need an ``answer`` per sample; multiple-choice ones ``choices`` and an
    ``answer`` among them. Raises ValueError otherwise, or for a name that is not a plain
    identifier (lmms-eval's task names).
    """
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"name must be letters, digits, '_' or '-', got {name!r}")
    if not samples:
        raise ValueError("samples must not be empty")
    os.makedirs(folder, exist_ok=True)
    data = os.path.abspath(os.path.join(folder, f"{name}.jsonl"))
    with open(data, "w") as f:
        for i, s in enumerate(samples):
            if s.answer is None:
                raise ValueError(f"sample {i} ({os.path.basename(s.image)}) has no answer")
            row = {"id": i, "image": os.path.abspath(s.image), "question": s.prompt, "answer": s.answer}
            if multiple_choice:
                if s.answer not in s.choices:
                    raise ValueError(f"sample {i}: answer {s.answer!r} must be one of its choices {s.choices}")
                row["choices"] = list(s.choices)
                row["label"] = s.choices.index(s.answer)
            f.write(json.dumps(row) + "\n")
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {_yaml_string(data)}", "test_split: test",
             "doc_to_visual: !function pio_kernels.eval.tasks.local.doc_to_visual",
             "doc_to_text: !function pio_kernels.eval.tasks.local.doc_to_text"]
    if multiple_choice:
        lines += ["output_type: multiple_choice", "doc_to_choice: choices", "doc_to_target: label",
                  "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true"]
    else:
        lines += ["output_type: generate_until", "doc_to_target: answer", "generation_kwargs:",
                  f"  max_new_tokens: {int(max_new_tokens)}", "  temperature: 0", "  until:", "    - \"\\n\"",
                  "metric_list:", "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true",
                  "    ignore_case: true", "    ignore_punctuation: true"]
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
