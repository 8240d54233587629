"""Evaluation of pio schedules: accuracy through lmms-eval, label-free fidelity, schedule search.

Install with ``pip install -e .[eval] && pip install --no-deps lmms-eval==0.7.3`` (docs/evaluate.md).

    schedules.py     presets by name and by family (``default``), the text syntax of schedule
                     fields, PioConfig construction
    accounting.py    the SPEC accounting: visual tokens per layer, retention, FLOPs (a priori and
                     from the engine's last_stats)
    vlm.py           LocalVLM: a local checkpoint (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
                     Qwen2.5-VL, Qwen3-VL dense or MoE) behind one batched generate /
                     loglikelihood / first-token interface, with per-sample stats
    lmms_plugin.py   the lmms-eval model ``pio`` (entry point ``lmms_eval.models``)
    fidelity.py      agreement, first-token KL and hidden-state drift against the unpruned model
    tune.py          pio-tune: schedule search meeting a retention target exactly
    cli.py           the ``pio-eval`` and ``pio-tune`` console scripts
    tasks/local.py   a folder of images + prompts, and lmms-eval tasks over it
    tiny.py          tiny random-weight checkpoints written offline (tests, trying the workflow)

Importing this package imports neither lmms-eval nor transformers.
"""
