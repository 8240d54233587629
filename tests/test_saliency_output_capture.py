"""The probe inside a running model leaves transformers' output capturing alone (issue 10, item 10).

A forward pre-hook on a middle decoder layer runs the probe on that layer's input while
the model records ``output_hidden_states`` and ``output_attentions`` (eager attention, so
every layer hands over its weights). The model's outputs (how many hidden states and
attention maps, and their values) must equal the run without the hook, and the hook must
run once per forward: the probe calls ``layer.forward``, so the layer's own hooks (where
hidden states are recorded, and where pio's stage hook sits) do not fire for it.

The old reference called ``layer(...)`` with transformers' private output collector set to
``None``: here it recursed into the hook (no re-entry guard) and failed. Under
``torch.compile`` it could also wipe the surrounding model's collector; that variant did not
reproduce on CPU here (dynamo runs the hooked frames eagerly, 30-50 s to compile a 3-layer
model), so there is no compiled test.
"""
import pytest
import torch

import pio_kernels
from pio_kernels import reference
from pio_kernels.integrations import hf

pytestmark = pytest.mark.integration


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=60, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _probe_hook(probe, final_norm, lm_head, calls):
    def hook(layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        scores = probe(layer, final_norm, lm_head, hidden, kwargs["position_embeddings"])
        calls.append(scores)
    return hook


def _same_outputs(want, got):
    assert len(got.hidden_states) == len(want.hidden_states)
    assert len(got.attentions) == len(want.attentions)
    for a, b in zip(want.hidden_states, got.hidden_states):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for a, b in zip(want.attentions, got.attentions):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)


@pytest.mark.parametrize("probe", [reference.proxy_saliency, pio_kernels.proxy_saliency], ids=["reference", "fast"])
def test_llama_outputs_unchanged_by_a_probe_in_a_hook(probe):
    model = _tiny_llama()
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0

    def run():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)

    want = run()
    assert len(want.hidden_states) == 4 and len(want.attentions) == 3 and want.attentions[0] is not None
    calls = []
    handle = model.model.layers[1].register_forward_pre_hook(
        _probe_hook(probe, model.model.norm, model.lm_head, calls), with_kwargs=True)
    try:
        got = run()
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0].shape == (2, 9) and calls[0].max() > 0
    _same_outputs(want, got)
    assert hf.attention_implementation(model.config) == "eager"  # restored after the probe


def test_llava_outputs_unchanged_by_a_probe_in_a_hook():
    from test_llava import IMAGE, _llava, _pixels
    model = _llava(layers=4, attn="eager")
    lm = model.model.language_model
    ids = torch.tensor([[1, 2] + [IMAGE] * 16 + [3, 4, 5]])

    def run():
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=_pixels(1), output_hidden_states=True, output_attentions=True)

    want = run()
    calls = []
    handle = lm.layers[2].register_forward_pre_hook(_probe_hook(reference.proxy_saliency, lm.norm, model.lm_head,
                                                                calls), with_kwargs=True)
    try:
        got = run()
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0].max() > 0
    _same_outputs(want, got)


def test_reference_fires_no_hook_of_the_layer():
    model = _tiny_llama()
    layer = model.model.layers[1]
    fired = []
    handles = [layer.register_forward_pre_hook(lambda *a: fired.append("pre")),
               layer.register_forward_hook(lambda *a: fired.append("post"))]
    hidden = torch.randn(1, 6, 32)
    pe = model.model.rotary_emb(hidden, torch.arange(6)[None])
    try:
        scores = reference.proxy_saliency(layer, model.model.norm, model.lm_head, hidden, pe)
    finally:
        for h in handles:
            h.remove()
    assert fired == [] and scores.max() > 0
