"""pio-kernels: training-free visual-token selection for VLMs (PIO-FVLM / TRIO).

Public API:
    select_tokens       greedy cosine NMS with a fixed budget (``torch.ops.pio.select_tokens``)
    available_backends  the select_tokens paths that can run on a device
    proxy_saliency      gradient saliency from the layer-local proxy loss (exact reduced probe)
    supports_fast_path  whether a decoder layer takes proxy_saliency's fast path
    reference           the literal algorithm, the oracle of every fast path

Model integrations live in :mod:`pio_kernels.integrations`.
"""
from pio_kernels import reference
from pio_kernels.ops import HAS_EXTENSION, available_backends, select_tokens
from pio_kernels.saliency import proxy_saliency, supports_fast_path

__all__ = ["HAS_EXTENSION", "available_backends", "proxy_saliency", "reference", "select_tokens",
           "supports_fast_path"]
__version__ = "0.1.0"
