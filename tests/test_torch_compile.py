"""``torch.compile(model.forward)`` on a pio model: the same outputs, and graph breaks only where
pio's work is data-dependent (issue 10).

A decoding step through a pio cache must trace as the stock model's does (no break of pio's:
that is the step a compiled generate runs over and over). A prefill selects visual tokens, which
is data-dependent by nature; pio keeps that work behind a few ``torch.compiler.disable``
boundaries (the prompt's entry, each stage, the end of the prefill, the vision probes) instead of
breaking the graph at every host read inside it.

Graphs are counted with a backend that records what dynamo hands it (one graph more than the
breaks) and runs the captured graph as is, so the outputs can be compared with eager ones.
"""
from __future__ import annotations

import copy

import pytest
import torch

from pio_kernels.integrations import apply_pio, hf, remove_pio
from test_generate_modes import FAMILIES, _model

DECODE_TOKEN = 5  # an ordinary text token (a random model's argmax could be an image placeholder)
# Graphs pio may add to a one-stage prefill with the encoder side (6 measured with transformers
# 5.24): the prompt's entry, the stage, the end of the prefill, and the stock frames resumed after
# each. Before these boundaries existed that prefill added 66 breaks, and every decoding step 14.
EXTRA_PREFILL_GRAPHS = 8


def _counting_compile(fn):
    graphs: list = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, dynamic=False), graphs  # counts independent of earlier shapes


def _step_inputs(inputs: dict, cache) -> dict:
    batch = inputs["input_ids"].shape[0]
    step = dict(input_ids=torch.full((batch, 1), DECODE_TOKEN), **hf.cache_kwargs(cache))
    mask = inputs.get("attention_mask")
    if mask is not None:
        step["attention_mask"] = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
    return step


def _compiled_step(model, inputs: dict):
    """(graphs of one compiled decoding step, its logits, the eager step's logits) after an eager prefill."""
    with torch.no_grad():
        cache = hf.output_cache(model(**inputs, use_cache=True))
        twin = copy.deepcopy(cache)
        want = model(**_step_inputs(inputs, cache)).logits
        compiled, graphs = _counting_compile(model.forward)
        got = compiled(**_step_inputs(inputs, twin)).logits
    return len(graphs), got, want


# Qwen's stock decoding step takes a 2-D mask only together with positions: those steps go maskless.
@pytest.mark.integration
@pytest.mark.parametrize("name, kind", [("llava", "padded"), ("llava-ve", "single"), ("qwen", "single"),
                                        ("qwen-ve", "single")])
def test_a_compiled_decoding_step_has_no_pio_graph_break_and_equals_eager(name, kind):
    family = FAMILIES[name]
    model = _model(family)
    inputs = family.inputs(kind)
    if kind == "single":
        inputs.pop("attention_mask")
    stock_graphs, _, _ = _compiled_step(model, inputs)
    apply_pio(model, family.pruned)
    try:
        graphs, got, want = _compiled_step(model, inputs)
    finally:
        remove_pio(model)
        torch._dynamo.reset()
    assert graphs == stock_graphs, f"a pio decoding step compiles to {graphs} graphs, the stock one to {stock_graphs}"
    # under compile pio always builds the step's mask (eager may pass None): equal up to rounding
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_compiled_prefill_breaks_only_at_pio_boundaries_and_equals_eager():
    """(Over a minute of tracing here: run on the pinned transformers only, not marked integration.)"""
    family = FAMILIES["llava-ve"]
    model = _model(family)
    inputs = family.inputs("single")
    with torch.no_grad():
        model(**inputs)  # transformers installs its output-capturing hooks on a first call (a break of its own)
        compiled, graphs = _counting_compile(model.forward)
        compiled(**inputs)
    stock = len(graphs)
    apply_pio(model, family.pruned)
    try:
        compiled, graphs = _counting_compile(model.forward)
        with torch.no_grad():
            want = model(**inputs).logits
            got = compiled(**inputs).logits
    finally:
        remove_pio(model)
        torch._dynamo.reset()
    assert len(graphs) - stock <= EXTRA_PREFILL_GRAPHS, (len(graphs), stock)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
