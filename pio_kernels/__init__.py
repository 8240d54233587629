"""pio-kernels: training-free visual-token selection for VLMs (PIO-FVLM / TRIO).

Public API:
    select_tokens   greedy cosine NMS with a fixed budget (``torch.ops.pio.select_tokens``)
    proxy_saliency  gradient saliency from the layer-local proxy loss
    reference       the literal algorithm, the oracle of every fast path

Model integrations live in :mod:`pio_kernels.integrations`.
"""
from pio_kernels import reference
from pio_kernels.ops import HAS_EXTENSION, select_tokens
from pio_kernels.saliency import proxy_saliency

__all__ = ["HAS_EXTENSION", "proxy_saliency", "reference", "select_tokens"]
__version__ = "0.1.0"
