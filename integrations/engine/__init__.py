"""Model-independent machinery of the integrations, one module per responsibility.

    adapter.py   the adapter interface (the model-specific questions) and the registry
    hooks.py     install / uninstall and the hooks that drive a forward pass
    state.py     per-model and per-prefill state: cuts, selections, statistics
    stage.py     one language-model stage: score, select per image, gather rows and positions
    encoder.py   the encoder-side cut and the shared SPEC 4 rules (windows, merging)
    masks.py     the attention mask each implementation takes

Every transformers convention these rely on is read through :mod:`..hf`.
"""
from .adapter import Adapter, adapter_for, features_of, register_adapter
from .encoder import merge_dropped, split_local_global, window_global
from .hooks import install, uninstall
from .masks import build_attention_mask
from .stage import resolve_budget
from .state import PioState

__all__ = ["Adapter", "PioState", "adapter_for", "build_attention_mask", "features_of", "install",
           "merge_dropped", "register_adapter", "resolve_budget", "split_local_global", "uninstall",
           "window_global"]
