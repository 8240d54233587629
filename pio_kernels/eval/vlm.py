"""A local VLM checkpoint behind one batched interface: what the plugin, fidelity and pio-tune run.

``LocalVLM.load(path)`` detects the family from the checkpoint's ``config.json``
(``model_type``, see :data:`FAMILIES`: ``llava`` -> LLaVA-1.5, ``llava_next`` -> LLaVA-NeXT,
``llava_onevision`` -> LLaVA-OneVision, ``qwen2_vl`` -> Qwen2-VL, ``qwen2_5_vl`` -> Qwen2.5-VL,
``qwen3_vl`` / ``qwen3_vl_moe`` -> Qwen3-VL dense / MoE), loads the stock Hugging Face class and
its processor offline (``local_files_only``), and then:

* ``prompt(text, n_images)`` formats a user turn with the checkpoint's chat template (images
  first, then the text), or the family's plain format when the checkpoint has no template;
* ``encode(prompts, images)`` pads a batch on the left (so the last prompt token of every
  sample is the last row) and moves it to the model's device and dtype;
* ``generate`` / ``loglikelihood`` / ``first_token`` run a whole batch at once and return,
  with their results, one :class:`~.accounting.SampleStats` per sample (visual tokens in,
  kept per stage, retention, FLOPs by the SPEC formula, selection time);
* ``use(config)`` applies a PioConfig (``None``: the stock model) for the calls that follow.

The processor classes of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision need torchvision
(for their video processors) in transformers 5; without it the checkpoint's tokenizer and (PIL)
image processor are composed here the same way, images only (:class:`_ImageTextProcessor`):
:class:`_QwenImageTextProcessor` and :class:`_OnevisionImageTextProcessor`.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .accounting import SampleStats, prefill_stats, text_dims

__all__ = ["FAMILIES", "Continuation", "FirstToken", "LocalVLM", "detect_family"]

# model_type -> (family, the stock transformers class)
_CLASSES = {
    "llava": ("llava-1.5", "LlavaForConditionalGeneration"),
    "llava_next": ("llava-next", "LlavaNextForConditionalGeneration"),
    "llava_onevision": ("llava-onevision", "LlavaOnevisionForConditionalGeneration"),
    "qwen2_vl": ("qwen2-vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("qwen3-vl", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("qwen3-vl-moe", "Qwen3VLMoeForConditionalGeneration"),
}
FAMILIES = {model_type: family for model_type, (family, _) in _CLASSES.items()}
# Families whose prompts mark an image with <|vision_start|><|image_pad|><|vision_end|>
_QWEN_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def detect_family(path: str) -> str:
    """The family of a local checkpoint: a value of :data:`FAMILIES` (``llava-1.5``,
    ``llava-next``, ``llava-onevision``, ``qwen2-vl``, ``qwen2.5-vl``, ``qwen3-vl``,
    ``qwen3-vl-moe``). ValueError for another ``model_type`` names every supported one."""
    from transformers import AutoConfig
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(f'{k} ({v})' for k, v in FAMILIES.items())}")
    return FAMILIES[model_type]


def _model_class(family: str):
    import transformers
    name = next(cls for fam, cls in _CLASSES.values() if fam == family)
    return getattr(transformers, name)


def _dtype(dtype: str | torch.dtype | None):
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return "auto" if dtype is None else dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


class _ImageTextProcessor:
    """A processor from a tokenizer and an image processor, images only, for the families whose
    processor class needs torchvision (for its video processor).

    The image processor's outputs are passed on; each ``image_token`` of the text becomes as many
    image tokens as :meth:`tokens_per_image` says that image has, then the text is tokenized.
    """

    image_token: str

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def tokens_per_image(self, vision: dict) -> list[int]:
        """Image tokens of each image, in order, from the image processor's outputs ``vision``."""
        raise NotImplementedError

    def __call__(self, text: list[str], images=None, padding=True, padding_side="left", return_tensors="pt"):
        out: dict[str, Any] = {}
        text = list(text)
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out.update(vision)
            counts = iter(self.tokens_per_image(vision))
            marker = "\x00PIO_IMAGE\x00"
            expanded = []
            for t in text:
                while self.image_token in t:
                    t = t.replace(self.image_token, marker * next(counts), 1)
                expanded.append(t.replace(marker, self.image_token))
            text = expanded
        out.update(self.tokenizer(text, padding=padding, padding_side=padding_side, return_tensors=return_tensors))
        return out


class _QwenImageTextProcessor(_ImageTextProcessor):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL inputs from a tokenizer and an image processor, images only.

    Does what ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` and ``Qwen3VLProcessor`` do for images
    (their image side is the same): the image processor gives
    ``pixel_values`` and ``image_grid_thw``; each ``<|image_pad|>`` of the text becomes
    ``t * h * w / merge^2`` of them; ``mm_token_type_ids`` marks image rows with 1.
    """

    def __init__(self, tokenizer, image_processor):
        super().__init__(tokenizer, image_processor)
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def tokens_per_image(self, vision: dict) -> list[int]:
        return (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()

    def __call__(self, text: list[str], images=None, **kwargs):
        out = super().__call__(text, images, **kwargs)
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).long()
        return out


class _OnevisionImageTextProcessor(_ImageTextProcessor):
    """LLaVA-OneVision inputs from a tokenizer and an image processor, images only.

    Does what ``LlavaOnevisionProcessor`` does for images: the image processor gives
    ``pixel_values`` (crops per image), ``image_sizes`` and ``batch_num_images`` (images per
    sample, when ``images`` are given per sample); each ``<image>`` of the text becomes as many
    image tokens as the model makes features of that image, newline tokens included. The count
    is the model's own: its ``pack_image_features`` (unpadding, the ``anyres_max`` downscale,
    newline tokens) run on placeholder features one channel wide, so it cannot drift from the
    model's layout.
    """

    def __init__(self, tokenizer, image_processor, model):
        super().__init__(tokenizer, image_processor)
        self.model = model
        self.image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)

    def tokens_per_image(self, vision: dict) -> list[int]:
        """Image tokens of each image (its features, newline tokens included), as the model lays them out."""
        from pio_kernels.integrations import hf
        config = self.model.config
        image_sizes = vision["image_sizes"]
        crops = hf.llava_onevision_crops(config, image_sizes, vision.get("batch_num_images"))
        side = config.vision_config.image_size // config.vision_config.patch_size
        placeholders = [torch.zeros(n, side * side, 1) for n in crops]
        _, lengths = hf.image_feature_owner(self.model).pack_image_features(
            placeholders, image_sizes, image_newline=torch.zeros(1), vision_aspect_ratio=config.vision_aspect_ratio)
        return [int(n) for n in lengths]


def _load_image_processor(path: str):
    """The checkpoint's image processor. Where ``AutoImageProcessor`` needs torchvision (transformers
    5.17), the PIL version of the class its ``preprocessor_config.json`` names."""
    from transformers import AutoImageProcessor
    try:
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except ImportError:
        pass
    import transformers
    with open(os.path.join(path, "preprocessor_config.json")) as f:
        name = json.load(f).get("image_processor_type") or ""
    base = name.removesuffix("Fast").removesuffix("Pil")
    cls = getattr(transformers, base + "Pil", None)
    if not base or cls is None:
        raise ImportError(f"{path}: the image processor {name!r} needs torchvision, and it has no PIL version")
    return cls.from_pretrained(path, local_files_only=True)


def _load_processor(path: str, family: str, model):
    """The checkpoint's processor; without torchvision, where the family's processor class needs it,
    the checkpoint's tokenizer and image processor composed for images."""
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except ImportError:
        if family not in _QWEN_FAMILIES + ("llava-onevision",):
            raise
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = _load_image_processor(path)
    if family == "llava-onevision":
        return _OnevisionImageTextProcessor(tokenizer, image_processor, model)
    return _QwenImageTextProcessor(tokenizer, image_processor)


@dataclass
class Continuation:
    """A continuation's score: the sum of its tokens' log-probabilities, whether greedy decoding
    produces it, and its number of tokens."""

    logprob: float
    greedy: bool
    tokens: int


@dataclass
class FirstToken:
    """One forward over the prompts: first-token log-probabilities and the final prompt
    token's last-layer hidden state (the input of ``lm_head``), both fp32, per sample."""

    logprobs: torch.Tensor   # (B, V)
    hidden: torch.Tensor     # (B, D)
    stats: list[SampleStats]


class LocalVLM:
    """A loaded checkpoint; see the module docstring."""

    def __init__(self, model, processor, family: str, device: torch.device):
        self.model = model
        self.processor = processor
        self.family = family
        self.device = device
        self.config = None           # the PioConfig applied (None: stock)
        tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer = tokenizer
        cfg = model.config
        ids = [getattr(cfg, "image_token_id", None), getattr(cfg, "image_token_index", None)]
        self.image_token_ids = tuple(sorted({i for i in ids if i is not None}))
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_ids[0])
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, *, dtype: str | torch.dtype | None = "auto", attn_implementation: str | None = None,
             device: str | torch.device | None = None) -> "LocalVLM":
        """Loads ``path`` offline. ``dtype``: ``auto`` (the checkpoint's), ``float32``,
        ``bfloat16`` or ``float16``; ``attn_implementation``: ``sdpa`` / ``eager`` /
        ``flash_attention_2`` (default: transformers' choice); ``device``: default CUDA when
        available, else CPU."""
        family = detect_family(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        kwargs: dict[str, Any] = {"dtype": _dtype(dtype), "local_files_only": True}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = _model_class(family).from_pretrained(path, **kwargs).to(device).eval()
        return cls(model, _load_processor(path, family, model), family, device)

    @property
    def num_layers(self) -> int:
        return text_dims(self.model)[0]

    # -- schedules --------------------------------------------------------------------------
    def apply(self, config) -> None:
        """Applies ``config`` (a PioConfig, or ``None`` for the stock model), replacing any other."""
        from pio_kernels.integrations import apply_pio
        self.remove()
        if config is None:
            return
        apply_pio(self.model, config)
        self.config = config

    def remove(self) -> None:
        from pio_kernels.integrations import remove_pio
        if self.config is not None:
            remove_pio(self.model)
            self.config = None

    @contextlib.contextmanager
    def use(self, config) -> Iterator["LocalVLM"]:
        """``with vlm.use(config): ...`` runs with ``config``, then the stock model again."""
        self.apply(config)
        try:
            yield self
        finally:
            self.remove()

    # -- inputs -----------------------------------------------------------------------------
    def prompt(self, text: str, n_images: int) -> str:
        """One user turn asking ``text`` about ``n_images`` images, ready for generation. Text that
        already holds the image placeholder (``<image>``) keeps it where it is."""
        placeholder = "<image>"
        qwen = self.family in _QWEN_FAMILIES
        if placeholder in text and not qwen:
            body = [{"type": "text", "text": text}]
        else:
            text = text.replace(placeholder, "").strip()
            body = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                      add_generation_prompt=True)
        if qwen:
            images = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
            return f"<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n"
        images = "" if placeholder in text else "<image>\n" * n_images
        if self.family == "llava-onevision":
            return f"<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n"
        return f"USER: {images}{text} ASSISTANT:"

    def encode(self, prompts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor]:
        """A left-padded batch on the model's device; floating inputs in the model's dtype.

        LLaVA-OneVision's images go to its processor per sample (a sample with several images
        takes each image's base crop only, as the model expects); the others' as one list."""
        flat = [im for sample in images for im in sample]
        kwargs = dict(text=list(prompts), padding=True, padding_side="left", return_tensors="pt")
        if flat:
            kwargs["images"] = [list(sample) for sample in images] if self.family == "llava-onevision" else flat
        batch = self.processor(**kwargs)
        dtype = self.model.dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in dict(batch).items() if isinstance(v, torch.Tensor)}

    # -- accounting -------------------------------------------------------------------------
    def _stats(self, batch: dict[str, torch.Tensor]) -> list[SampleStats]:
        return prefill_stats(self.model, self.config, batch["input_ids"], self.image_token_ids,
                             batch.get("attention_mask"))

    # -- running ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[str], images: list[list[Any]], *, max_new_tokens: int = 32,
                 until: Sequence[str] = (), temperature: float = 0.0, top_p: float | None = None,
                 num_beams: int = 1) -> tuple[list[str], list[SampleStats]]:
        """Greedy (``temperature`` 0) or sampled continuations, cut at the first ``until`` string."""
        batch = self.encode(prompts, images)
        sample = temperature > 0
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=sample,
                                  temperature=temperature if sample else None, top_p=top_p if sample else None,
                                  num_beams=num_beams, pad_token_id=self.pad_token_id)
        stats = self._stats(batch)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        cut = []
        for text in texts:
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            cut.append(text)
        return cut, stats

    @torch.inference_mode()
    def loglikelihood(self, prompts: list[str], continuations: list[str], images: list[list[Any]]
                      ) -> tuple[list[Continuation], list[SampleStats]]:
        """``log P(continuation | prompt)``, whether greedy decoding gives it, and its token count,
        per sample.

        The continuation's tokens are those of ``prompt + continuation`` past the prompt's own
        (counted with the tokenizer, image placeholders unexpanded on both sides)."""
        full = [p + c for p, c in zip(prompts, continuations)]
        n_cont = [len(self.tokenizer(f, add_special_tokens=False).input_ids)
                  - len(self.tokenizer(p, add_special_tokens=False).input_ids) for f, p in zip(full, prompts)]
        for c, n in zip(continuations, n_cont):
            if n < 1:
                raise ValueError(f"continuation {c!r} adds no token to its prompt")
        batch = self.encode(full, images)
        keep = max(n_cont) + 1
        logits = self.model(**batch, logits_to_keep=keep).logits.float()  # (B, keep, V)
        stats = self._stats(batch)
        logprobs = F.log_softmax(logits[:, :-1], dim=-1)  # row j predicts token j + 1 of the kept window
        targets = batch["input_ids"][:, -keep + 1:]
        results = []
        for b, n in enumerate(n_cont):
            lp = logprobs[b, -n:]
            tok = targets[b, -n:]
            results.append(Continuation(float(lp.gather(1, tok[:, None]).sum()), bool((lp.argmax(-1) == tok).all()), n))
        return results, stats

    @torch.inference_mode()
    def first_token(self, prompts: list[str], images: list[list[Any]]) -> FirstToken:
        """One prefill: log-probabilities of the first generated token and the final prompt
        token's hidden state entering ``lm_head``."""
        batch = self.encode(prompts, images)
        captured: list[torch.Tensor] = []
        handle = self.model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: captured.append(args[0][:, -1].float()))
        try:
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1].float()
        finally:
            handle.remove()
        return FirstToken(F.log_softmax(logits, dim=-1), captured[0], self._stats(batch))
