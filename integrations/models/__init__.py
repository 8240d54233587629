"""One adapter per model family (see :mod:`..engine.adapter` for the interface).

    llava.py        LLaVA-1.5 and LLaVA-NeXT
    qwen2_5_vl.py   Qwen2.5-VL
    qwen2_vl.py     Qwen2-VL (Qwen2.5-VL's adapter, full-attention encoder side)
    qwen3_vl.py     Qwen3-VL and Qwen3-VL-MoE (Qwen2-VL's adapter, DeepStack on the rows kept)
    llava_onevision.py  LLaVA-OneVision (LLaVA-NeXT's spans, newline tokens kept, received attention)
"""
