"""The transformers conventions pio relies on (integrations/hf.py), one test per assumption.

When a transformers release changes one of these, the test that fails names the assumption;
hf.py is the one file to change. Runs on every release CI tests (``-m integration``).
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

import llava_factory as lf
import qwen2_5_vl_factory as qf
from pio_kernels.integrations import PioConfig, apply_pio, hf, remove_pio

pytestmark = pytest.mark.integration


def _llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=50)).eval()


def test_models_take_the_cache_under_one_of_the_known_keywords():
    from transformers import LlamaModel, LlavaModel, Qwen2_5_VLModel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    for cls in (LlamaModel, LlavaModel, Qwen2_5_VLModel):
        assert set(hf.cache_kwargs(None)) <= set(inspect.signature(cls.forward).parameters), cls.__name__
    layer_params = set(inspect.signature(LlamaDecoderLayer.forward).parameters)
    assert layer_params & set(hf.CACHE_KEYS) or "kwargs" in layer_params


def test_outputs_carry_the_cache_in_a_field_and_get_seq_length_counts_rows():
    model = _llama()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=True)
    cache = hf.output_cache(out)
    assert cache is not None and len(cache.layers) == 2
    assert cache.get_seq_length() == hf.stored_length(cache, 1) == 4


def test_a_cache_reporting_the_callers_numbering_behaves_as_its_class():
    from transformers import DynamicCache
    model = _llama()
    with torch.no_grad():
        cache = hf.output_cache(model(input_ids=torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), use_cache=True))
    hf.report_caller_lengths(cache, [3, 5])
    assert isinstance(cache, DynamicCache) and not cache.is_compileable
    assert (cache.get_seq_length(), cache.get_seq_length(1), hf.stored_length(cache, 1)) == (7, 9, 4)
    twin = copy.deepcopy(cache)
    assert type(twin) is type(cache) and twin.get_seq_length() == 7
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.crop(-1)  # generate crops by a negative count (assisted decoding)
    assert (cache.get_seq_length(), hf.stored_length(cache, 0)) == (6, 3)
    hf.report_caller_lengths(cache, [0, 0])
    assert type(cache) is DynamicCache and cache.get_seq_length() == 3


def test_static_layers_have_a_fixed_length():
    from transformers import StaticCache
    model = _llama()
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **hf.cache_kwargs(cache))
    assert hf.is_static_cache(cache) and hf.max_cache_length(cache) == 16 and hf.stored_length(cache) == 3


def test_a_4d_mask_reaches_the_layers_as_given():
    """pio hands the language model 4-D masks of its own (static caches, continuations)."""
    model = _llama()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, a, k: seen.append(k["attention_mask"]), with_kwargs=True)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert seen[0] is mask


def test_key_validity_reads_every_mask_format():
    valid = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    four = causal[None, None] & valid[:, None, None, :]
    for mask in (valid.long(), four, torch.where(four, 0.0, -1e9), {"full_attention": four}):
        got, standard = hf.key_validity(mask, 2, 4, 4, "cpu")
        assert torch.equal(got, valid) and standard
    custom = four.clone()
    custom[:, :, 1, 2] = True  # a query attends to a later key
    assert not hf.key_validity(custom, 2, 4, 4, "cpu")[1]
    assert torch.equal(hf.key_validity(None, 2, 4, 4, "cpu")[0], torch.ones(2, 4, dtype=torch.bool))


def test_attention_modules_read_the_implementation_from_the_config_at_each_call():
    """``attention_implementation_as`` switches what an attention module runs (the reference
    probe runs SDPA this way inside an eager model) and restores it; ``build_model`` sets it."""
    from transformers import LlamaConfig, LlamaModel
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)
    model = hf.build_model(LlamaModel, config, attn_implementation="eager")
    assert hf.attention_implementation(model.config) == "eager" and not model.training
    ids = torch.tensor([[1, 2, 3, 4]])

    def weights():  # the attention weights the first layer's attention returns (eager only)
        with torch.no_grad():
            embeddings = hf.rotary(model, torch.zeros(1, 4, 32), torch.arange(4)[None])
            return model.layers[0].self_attn(model.embed_tokens(ids), embeddings, attention_mask=None)[1]

    assert weights() is not None
    with hf.attention_implementation_as(model.config, "sdpa"):
        assert hf.attention_implementation(model.config) == "sdpa"
        assert weights() is None
    assert hf.attention_implementation(model.config) == "eager" and weights() is not None


@pytest.mark.parametrize("suspended", [True, False])
def test_modules_called_inside_outputs_not_recorded_add_no_captured_outputs(suspended):
    """Output capturing records every call of a decoder layer while the model's forward runs; a
    layer called by a hook inside ``outputs_not_recorded`` adds nothing (outside it, it does:
    the check can fail)."""
    import contextlib
    model = _llama(layers=2)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = len(model(input_ids=ids, output_hidden_states=True).hidden_states)

    def hook(layer, args, kwargs):
        with hf.outputs_not_recorded() if suspended else contextlib.nullcontext():
            model.layers[0](*args, **kwargs)

    handle = model.layers[1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            got = len(model(input_ids=ids, output_hidden_states=True).hidden_states)
    finally:
        handle.remove()
    assert (got == want) == suspended, (got, want)


def test_rotary_embedding_returns_cos_sin_per_position():
    model = _llama()
    hidden = torch.zeros(2, 5, 32)
    cos, sin = hf.rotary(model, hidden, torch.arange(5)[None].expand(2, 5))
    assert cos.shape == sin.shape == (2, 5, 8)


@pytest.mark.parametrize("use_generate", [True, False])
def test_image_features_pass_through_get_image_features_once(use_generate):
    """generate (which may encode before the prefill, 5.24+) and the forward both call the
    instance attribute ``model.model.get_image_features``: pio's wrapper sees every image."""
    model = lf.make_llava(layers=2)
    apply_pio(model, PioConfig(layers=[1], keep=[4]))
    owner = hf.image_feature_owner(model)
    calls = []
    wrapped = owner.get_image_features
    owner.get_image_features = lambda *a, **k: (calls.append(1), wrapped(*a, **k))[1]
    owner.get_image_features.__signature__ = inspect.signature(wrapped)
    inputs = {"input_ids": torch.tensor([lf.prompt([1, 2], 1, [3, 4, 5, 6])]), "pixel_values": lf.pixels(1)}
    with torch.no_grad():
        if use_generate:
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        else:
            model(**inputs)
    del owner.get_image_features
    remove_pio(model)
    assert len(calls) == 1


def test_llava_next_and_qwen_helpers_exist():
    from transformers import LlavaNextConfig, LlavaNextModel
    config = LlavaNextConfig()
    assert hf.llava_next_crops(config, torch.tensor([[336, 672]])) == [3]
    assert "image_newline" in inspect.signature(LlavaNextModel.pack_image_features).parameters
    visual = qf.make_model(layers=2).model.visual
    index = hf.vision_window_index(visual, torch.tensor([[1, 8, 8]]))
    assert sorted(index.tolist()) == list(range(16))
    block_params = inspect.signature(type(visual.blocks[0]).forward).parameters
    assert {"cu_seqlens", "position_embeddings"} <= set(block_params)


def test_qwen_language_model_takes_a_mask_per_layer_type():
    model = qf.make_model(layers=2)
    lm = model.model.language_model
    inputs = torch.randn(1, 4, lm.config.hidden_size)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        a = lm(inputs_embeds=inputs, attention_mask={"full_attention": mask}).last_hidden_state
        b = lm(inputs_embeds=inputs).last_hidden_state
    torch.testing.assert_close(a, b)
