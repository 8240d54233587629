"""Tiny random-weight VLM checkpoints, written to a folder without any download.

``write_checkpoint(path, family)`` saves a stock Hugging Face model (random weights, a few
layers of width 64) with a processor (or, for the families whose processor class needs
torchvision, a tokenizer and a PIL image processor) that ``from_pretrained(path,
local_files_only=True)`` loads back. The tokenizer is a byte-level BPE trained on a fixed
sentence, so every text encodes and decodes, and the chat template is the family's prompt format.
These checkpoints exercise the evaluation workflow end to end (the lmms-eval plugin, ``pio-eval
fidelity``, ``pio-tune``) on a CPU: their answers mean nothing.

``sample_images()`` lists the photographs that ship with matplotlib (its sample data).

Families (8 decoder layers each by default):

* ``llava-1.5``: CLIP 48 px, 6 px patches: 64 visual tokens;
* ``llava-next``: the same tower on anyres crops of 48 px;
* ``llava-onevision``: SigLIP on crops of 56 px, 7 px patches (64 tokens a crop), anyres tiling
  up to 2 x 2 crops, ``anyres_max_2`` (larger high-resolution grids are downscaled), Qwen2 decoder;
* ``qwen2-vl``, ``qwen2.5-vl``, ``qwen3-vl``, ``qwen3-vl-moe``: 2 px patches, 2x2 merge (16 to 64
  visual tokens an image), M-RoPE; Qwen2.5-VL's tower has windows, Qwen3-VL's DeepStack
  features after decoder layers 0 and 1 (MoE: 4 experts, 2 a token).
"""
from __future__ import annotations

import os

import torch

__all__ = ["FAMILIES", "sample_images", "write_checkpoint"]

FAMILIES = ("llava-1.5", "llava-next", "qwen2.5-vl", "qwen2-vl", "qwen3-vl", "qwen3-vl-moe", "llava-onevision")
_CORPUS = ("What is shown in this image? Answer with one word. Is there a person in the image? yes no "
           "A B C D The photograph shows a woman in a uniform, a logo and a present. Describe it briefly.")
_LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% else %}ASSISTANT: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# LLaVA-OneVision (Qwen2 decoder): the Qwen turns, with LLaVA's ``<image>`` line before the text
_ONEVISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def sample_images() -> list[str]:
    """Paths of the photographs in matplotlib's sample data (grace_hopper.jpg first)."""
    from matplotlib import cbook
    names = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
    return [str(cbook.get_sample_data(name, asfileobj=False)) for name in names]


def _tokenizer(specials: list[str], **roles):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def _randomise_norms(model: torch.nn.Module) -> None:
    """Norm gains away from 1, so a path that ignores them cannot agree by chance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)


def _save_model(path: str, model: torch.nn.Module, tokenizer) -> None:
    """Saves ``model`` with norm gains away from 1, generating with ``tokenizer``'s padding and
    end of turn (the caller saves the tokenizer or processor beside it)."""
    _randomise_norms(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)


def _text_config(vocab: int, layers: int, **extra) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=2048, **extra)


def _llava(path: str, next_: bool, layers: int, seed: int) -> None:
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor,
                              LlavaProcessor)

    tokenizer = _tokenizer(["<pad>", "<s>", "</s>", "<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                           extra_special_tokens={"image_token": "<image>"})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                              image_size=48, patch_size=6, projection_dim=32)
    text = LlamaConfig(**_text_config(len(tokenizer), layers, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    common = dict(vision_config=vision, text_config=text, image_token_id=image_id, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    if next_:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
        pinpoints = [[48, 48], [48, 96], [96, 48], [96, 96]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48},
                                                     image_grid_pinpoints=pinpoints)
        processor_class, model_class = LlavaNextProcessor, LlavaNextForConditionalGeneration
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        config = LlavaConfig(**common)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
        processor_class, model_class = LlavaProcessor, LlavaForConditionalGeneration
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, patch_size=6,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=_LLAVA_TEMPLATE)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _save_model(path, model, tokenizer)
    processor.save_pretrained(path)


_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer():
    """The Qwen families' tokenizer (their special tokens, ``<|im_end|>`` ends a turn) with the
    Qwen chat template, and the ids the model config names."""
    tokenizer = _tokenizer(_QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = _QWEN_TEMPLATE
    ids = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>", vision_start_token_id="<|vision_start|>",
               vision_end_token_id="<|vision_end|>")
    return tokenizer, {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in ids.items()}


def _mrope_text_config(vocab: int, layers: int, eos: int, **extra) -> dict:
    """A decoder with M-RoPE: the rotary half of each head split over (t, h, w) as in the released
    checkpoints (``extra`` may set ``head_dim``; default width / heads = 16)."""
    half = extra.get("head_dim", 16) // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    rope.update(extra.pop("rope_extra", {}))
    return _text_config(vocab, layers, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=None, eos_token_id=eos,
                        rope_parameters=rope, **extra)


def _save_qwen(path: str, model, tokenizer) -> None:
    """Saves a Qwen-family model with its tokenizer and a PIL image processor (2 px patches, 2x2
    merge): 16x16 to 32x32 pixels after resizing, 16 to 64 visual tokens per image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    _save_model(path, model, tokenizer)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=2, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 256, "longest_edge": 1024}).save_pretrained(path)


def _qwen2_5_vl(path: str, layers: int, seed: int) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer, ids = _qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=_mrope_text_config(len(tokenizer), layers, tokenizer.eos_token_id),
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=8, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3], tokens_per_second=2),
        **ids, tie_word_embeddings=False, bos_token_id=None)
    torch.manual_seed(seed)
    _save_qwen(path, Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer)


def _qwen2_vl(path: str, layers: int, seed: int) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer, ids = _qwen_tokenizer()
    config = Qwen2VLConfig(
        text_config=_mrope_text_config(len(tokenizer), layers, tokenizer.eos_token_id),
        vision_config=dict(depth=4, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2),
        **ids, tie_word_embeddings=False, bos_token_id=None)
    torch.manual_seed(seed)
    _save_qwen(path, Qwen2VLForConditionalGeneration(config).eval(), tokenizer)


def _qwen3_vl(path: str, layers: int, seed: int, moe: bool) -> None:
    import transformers

    tokenizer, ids = _qwen_tokenizer()
    text = _mrope_text_config(len(tokenizer), layers, tokenizer.eos_token_id, head_dim=16,
                              rope_extra={"mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1)
    prefix = "Qwen3VLMoe" if moe else "Qwen3VL"
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text,
        # DeepStack: the features of vision blocks 0 and 2 are added after decoder layers 0 and 1
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 2]),
        **ids, tie_word_embeddings=False)
    torch.manual_seed(seed)
    _save_qwen(path, getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval(), tokenizer)


def _llava_onevision(path: str, layers: int, seed: int) -> None:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    tokenizer = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                           eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    tokenizer.chat_template = _ONEVISION_TEMPLATE
    # SigLIP on 56 px crops of 7 px patches (8 x 8 per crop), anyres tiling up to 2 x 2 crops;
    # anyres_max_2 downscales a high-resolution grid above 2 crops' worth of tokens
    pinpoints = [[56, 112], [112, 56], [112, 112]]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
                                image_size=56, patch_size=7)
    text = Qwen2Config(**_text_config(len(tokenizer), layers, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=None,
                                      eos_token_id=tokenizer.eos_token_id))
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2",
                                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _save_model(path, model, tokenizer)
    tokenizer.save_pretrained(path)
    LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56}, crop_size={"height": 56, "width": 56},
                                    image_grid_pinpoints=pinpoints).save_pretrained(path)


def write_checkpoint(path: str, family: str = "llava-1.5", *, layers: int = 8, seed: int = 0) -> str:
    """Writes a tiny random-weight checkpoint of ``family`` to ``path``; returns ``path``.

    Raises:
        ValueError: unknown family, or ``layers`` < 2.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    if layers < 2:
        raise ValueError(f"layers must be >= 2, got {layers}")
    os.makedirs(path, exist_ok=True)
    if family == "qwen2.5-vl":
        _qwen2_5_vl(path, layers, seed)
    elif family == "qwen2-vl":
        _qwen2_vl(path, layers, seed)
    elif family in ("qwen3-vl", "qwen3-vl-moe"):
        _qwen3_vl(path, layers, seed, moe=family == "qwen3-vl-moe")
    elif family == "llava-onevision":
        _llava_onevision(path, layers, seed)
    else:
        _llava(path, family == "llava-next", layers, seed)
    return path
