"""Label-free fidelity: how closely a pruned model follows the unpruned one, on any data.

Three measures per sample, each against the same model without selection (the *reference*):

``agreement``     the pruned model's greedy answer equals the reference's (after stripping
                  whitespace and case); the mean is the agreement rate.
``kl``            KL(P_ref || P_pruned) in nats of the first generated token's distribution.
``hidden_drift``  ``||h_pruned - h_ref|| / ||h_ref||`` of the final prompt token's last-layer
                  hidden state (the input of ``lm_head``); ``hidden_cosine`` is their cosine.

Identical inputs give exactly zero divergence (the reference and every run see the same batches
in the same order). Each run also records its retention and FLOPs by :mod:`.accounting`.

Python::

    from pio_kernels.eval.fidelity import compare, plot
    report = compare(vlm, samples, {"ours@11%": make_config("llava-1.5"), "random@11%": ...})
    plot(report, "fidelity.png")

CLI: ``pio-eval fidelity CHECKPOINT FOLDER --method ... --out DIR`` (see :mod:`.cli`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .schedules import describe
from .tasks.local import Sample

__all__ = ["OBJECTIVES", "Reference", "compare", "fidelity", "objective", "plot", "reference_outputs"]

OBJECTIVES = ("kl", "drift", "disagreement")


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def _batches(n: int, size: int) -> list[range]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def _load(samples: Sequence[Sample]) -> list[list[Any]]:
    from PIL import Image
    images = []
    for s in samples:
        with Image.open(s.image) as im:
            images.append([im.convert("RGB")])
    return images


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


@dataclass
class Reference:
    """The unpruned model's outputs on a list of samples (one row per sample)."""

    answers: list[str] | None     # greedy answers (None when generation was skipped)
    logprobs: torch.Tensor        # (N, V) fp32, first generated token
    hidden: torch.Tensor          # (N, D) fp32, final prompt token entering lm_head
    stats: list = field(default_factory=list)


def _run(vlm, samples: Sequence[Sample], config, *, batch_size: int, max_new_tokens: int, generate: bool,
         progress: bool, desc: str) -> Reference:
    images = _load(samples)
    prompts = [vlm.prompt(s.prompt, len(im)) for s, im in zip(samples, images)]
    answers: list[str] | None = [] if generate else None
    logprobs, hidden, stats = [], [], []
    batches = _batches(len(samples), batch_size)
    bar = _bar(len(samples), desc, progress)
    with vlm.use(config):
        for idx in batches:
            p, im = [prompts[i] for i in idx], [images[i] for i in idx]
            first = vlm.first_token(p, im)
            logprobs.append(first.logprobs.cpu())
            hidden.append(first.hidden.cpu())
            stats += first.stats
            if generate:
                texts, _ = vlm.generate(p, im, max_new_tokens=max_new_tokens)
                answers += texts
            bar.update(len(idx))
    bar.close()
    return Reference(answers, torch.cat(logprobs), torch.cat(hidden), stats)


def reference_outputs(vlm, samples: Sequence[Sample], *, batch_size: int = 4, max_new_tokens: int = 16,
                      generate: bool = True, progress: bool = True) -> Reference:
    """The unpruned model's answers, first-token log-probabilities and hidden states."""
    return _run(vlm, samples, None, batch_size=batch_size, max_new_tokens=max_new_tokens, generate=generate,
                progress=progress, desc="reference")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fidelity(vlm, samples: Sequence[Sample], config, reference: Reference | None = None, *, batch_size: int = 4,
             max_new_tokens: int = 16, generate: bool = True, progress: bool = True,
             name: str = "run") -> dict[str, Any]:
    """Fidelity of ``config`` (a PioConfig, or ``None``) against the unpruned model.

    Args:
        vlm: a :class:`~.vlm.LocalVLM` (no schedule applied).
        samples: the prompts and images (:func:`~.tasks.local.load_folder`).
        reference: :func:`reference_outputs` of the same samples with the same ``batch_size``
            (computed here when ``None``).
        generate: also generate answers (needed for ``agreement``); ``False`` runs one forward
            per batch.

    Returns:
        JSON-ready dict: ``name``, ``schedule``, means (``agreement``, ``kl``, ``hidden_drift``,
        ``hidden_cosine``, ``retention``, ``flops_fraction``, ``selection_ms``) and
        ``per_sample`` rows.
    """
    if not samples:
        raise ValueError("samples must not be empty")
    if reference is None:
        reference = reference_outputs(vlm, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                      generate=generate, progress=progress)
    if reference.logprobs.shape[0] != len(samples):
        raise ValueError(f"reference holds {reference.logprobs.shape[0]} samples, got {len(samples)} samples")
    run = _run(vlm, samples, config, batch_size=batch_size, max_new_tokens=max_new_tokens,
               generate=generate and reference.answers is not None, progress=progress, desc=name)
    p_ref = reference.logprobs.exp()
    kl = (p_ref * (reference.logprobs - run.logprobs)).sum(-1).clamp_min(0.0)  # (N,), 0 where identical
    diff = torch.linalg.vector_norm(run.hidden - reference.hidden, dim=-1)
    drift = diff / torch.linalg.vector_norm(reference.hidden, dim=-1).clamp_min(1e-30)
    cosine = torch.nn.functional.cosine_similarity(run.hidden, reference.hidden, dim=-1)
    rows = []
    for i, s in enumerate(samples):
        st = run.stats[i]
        row = {"image": s.image, "prompt": s.prompt, "kl": float(kl[i]), "hidden_drift": float(drift[i]),
               "hidden_cosine": float(cosine[i]), "retention": st.retained_fraction,
               "flops_fraction": st.tflops / st.tflops_stock if st.tflops_stock else None,
               "selection_ms": sum(st.selection_ms) if st.selection_ms else None, "kept": st.kept}
        if run.answers is not None:
            row.update(answer=run.answers[i], reference_answer=reference.answers[i],
                       agreement=float(_normalise(run.answers[i]) == _normalise(reference.answers[i])))
        rows.append(row)
    summary = {key: _mean([r.get(key) for r in rows]) for key in
               ("agreement", "kl", "hidden_drift", "hidden_cosine", "retention", "flops_fraction", "selection_ms")}
    return {"name": name, "schedule": describe(config), **summary, "per_sample": rows}


def compare(vlm, samples: Sequence[Sample], methods: dict[str, Any], *, batch_size: int = 4,
            max_new_tokens: int = 16, generate: bool = True, progress: bool = True) -> dict[str, Any]:
    """:func:`fidelity` of every ``{name: config}`` against one shared reference.

    Returns ``{"model": ..., "family": ..., "samples": n, "runs": [fidelity(...) per method]}``."""
    from tqdm import tqdm
    reference = reference_outputs(vlm, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  generate=generate, progress=progress)
    runs = []
    for name, config in tqdm(list(methods.items()), desc="methods", disable=not progress):
        runs.append(fidelity(vlm, samples, config, reference, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, generate=generate, progress=progress, name=name))
    model = getattr(vlm.model.config, "_name_or_path", None)
    return {"model": model, "family": vlm.family, "samples": len(samples), "batch_size": batch_size,
            "max_new_tokens": max_new_tokens, "runs": runs}


def _method_of(run: dict) -> str:
    """The method part of a run name (``method@schedule`` -> ``method``)."""
    return run["name"].split("@", 1)[0]


def plot(report: dict[str, Any], path: str) -> str:
    """Fidelity against retention, one line per method (runs named ``method@anything`` share a
    line): first-token KL, hidden drift and, when answers were generated, agreement."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kl", "first-token KL (nats)"), ("hidden_drift", "hidden-state drift")]
    if any(r.get("agreement") is not None for r in report["runs"]):
        panels.append(("agreement", "answer agreement"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    methods: dict[str, list[dict]] = {}
    for run in report["runs"]:
        methods.setdefault(_method_of(run), []).append(run)
    for ax, (key, label) in zip(axes[0], panels):
        for method, runs in methods.items():
            runs = sorted((r for r in runs if r.get(key) is not None and r.get("retention") is not None),
                          key=lambda r: r["retention"])
            if not runs:
                continue
            ys = [r[key] for r in runs]
            ax.plot([100 * r["retention"] for r in runs], ys, marker="o", label=method)
        ax.set_xlabel("retained visual tokens (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report.get('model') or ''} ({report.get('family')}), {report.get('samples')} samples: "
                 "pruned vs unpruned", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def objective(run: dict[str, Any], name: str = "kl") -> float:
    """A run's fidelity loss (lower is better): ``kl``, ``drift`` or ``disagreement``."""
    if name == "kl":
        return float(run["kl"])
    if name == "drift":
        return float(run["hidden_drift"])
    if name == "disagreement":
        if run.get("agreement") is None:
            raise ValueError("objective 'disagreement' needs generated answers")
        return 1.0 - float(run["agreement"])
    raise ValueError(f"objective must be one of kl, drift, disagreement; got {name!r}")

