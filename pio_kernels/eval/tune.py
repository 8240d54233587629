"""``pio-tune``: search a schedule (``layers`` / ``keep`` / ``encoder_keep``) for a retention target.

After the idea of automatically optimised pruning strategies (VFlowOpt, ICCV 2025): given a
model, a small calibration set and a target average retention, find the schedule whose fidelity
loss (:func:`.fidelity.objective`, default the first-token KL against the unpruned model) is
lowest, among schedules that meet the target **exactly** by the SPEC accounting
(:mod:`.accounting`):

    sum over decoder layers of the visual tokens each layer sees == round(target * N * L)

for the calibration images' ``N`` visual tokens and the model's ``L`` decoder layers (the
retention is then that integer over ``N * L``; 2048 / (576 * 32) = 1/9 exactly for LLaVA-1.5).

Search (deterministic given ``seed``; on a GPU only as deterministic as the model's kernels):

1. random phase: half the evaluation budget on distinct feasible schedules drawn at random
   (number of stages from ``stages``, layers, non-increasing budgets, optional encoder budget;
   the last budget is solved so that the total is exact);
2. local phase: the rest on feasible neighbours of the best so far (a layer moved by 1-2, a
   budget moved and the last one re-solved).

Budgets are token counts when every calibration image has the same ``N`` (LLaVA-1.5); otherwise
(dynamic resolution) they are written as fractions of each stage's input, exact at the
calibration set's median ``N`` and within rounding elsewhere.

The default of the model's family (:func:`.schedules.default_preset`: the published or default
preset for the nearest depth, scaled to the model's depth and token count when set for another)
is scored on the same objective and reported beside the best.
"""
from __future__ import annotations

import json
import os
import random
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from .accounting import schedule_tokens_per_layer
from .fidelity import OBJECTIVES, fidelity, objective, reference_outputs
from .schedules import default_preset, describe, make_config
from .tasks.local import Sample

__all__ = ["Candidate", "SearchSpace", "published_default", "search"]


@dataclass(frozen=True)
class Candidate:
    """A schedule in token counts at the reference ``N`` (``encoder`` None: no encoder stage)."""

    layers: tuple[int, ...]
    keep: tuple[int, ...]
    encoder: int | None = None


@dataclass(frozen=True)
class SearchSpace:
    """Where schedules live: ``n`` visual tokens per image, ``num_layers`` decoder layers, the
    exact token-layer total ``total``, stage counts ``stages``, encoder stage or not, and
    whether budgets are written as counts (``ints``) or fractions."""

    n: int
    num_layers: int
    total: int
    stages: tuple[int, ...] = (1, 2, 3)
    encoder: bool = False
    ints: bool = True

    def config(self, cand: Candidate, tau: float = 0.8, num_positions: int = 4):
        """The PioConfig of a candidate (counts, or fractions of each stage's input)."""
        from pio_kernels.integrations import PioConfig
        if self.ints:
            return PioConfig(layers=cand.layers, keep=cand.keep, encoder_keep=cand.encoder, tau=tau,
                             num_positions=num_positions)
        # (k + 0.5) / n: floor(fraction * n) == k (the engine's rule) despite the 6-digit rounding
        keep, prev = [], self.n if cand.encoder is None else cand.encoder
        for k in cand.keep:
            keep.append(round((k + 0.5) / prev, 6))
            prev = k
        enc = None if cand.encoder is None else round((cand.encoder + 0.5) / self.n, 6)
        return PioConfig(layers=cand.layers, keep=tuple(keep), encoder_keep=enc, tau=tau, num_positions=num_positions)

    def feasible(self, cand: Candidate) -> bool:
        """Whether the candidate's PioConfig meets the total exactly (after budget rounding)."""
        try:
            config = self.config(cand)
        except ValueError:
            return False
        return sum(schedule_tokens_per_layer(config, self.n, self.num_layers)) == self.total

    def _solve_last(self, layers: tuple[int, ...], head: list[int], encoder: int | None) -> Candidate | None:
        """Completes ``head`` (all budgets but the last) so that the total is exact, or None."""
        n0 = self.n if encoder is None else encoder
        used = layers[0] * n0
        for s, k in enumerate(head):
            used += (layers[s + 1] - layers[s]) * k
        span = self.num_layers - layers[-1]
        rest = self.total - used
        if rest <= 0 or rest % span:
            return None
        last = rest // span
        prev = head[-1] if head else n0
        if not 1 <= last < prev:
            return None
        cand = Candidate(tuple(layers), tuple(head) + (last,), encoder)
        return cand if self.feasible(cand) else None

    def sample(self, rng: random.Random, tries: int = 2000) -> Candidate | None:
        """A random feasible candidate (``None`` after ``tries`` rejections).

        Draws the stage count, the encoder budget (if any), the first layer among those that
        leave room for at least one token per later layer, the other layers, then each budget
        but the last below what the remaining total allows; the last one is solved."""
        total, n_layers = self.total, self.num_layers
        for _ in range(tries):
            stages = rng.choice(self.stages)
            if stages > n_layers - 1:
                continue
            encoder = None
            if self.encoder:
                top = min(self.n - 1, total - (n_layers - 1))
                if top < 2:
                    continue
                encoder = rng.randint(2, top)
            n0 = self.n if encoder is None else encoder
            first_max = min(n_layers - stages, (total - n_layers) // max(1, n0 - 1))
            if first_max < 1:
                continue
            first = rng.randint(1, first_max)
            layers = (first,) + tuple(sorted(rng.sample(range(first + 1, n_layers), stages - 1)))
            used, prev, head = first * n0, n0, []
            for s in range(stages - 1):
                span = layers[s + 1] - layers[s]
                hi = min(prev - 1, (total - used - (n_layers - layers[s + 1])) // span)
                if hi < 2:
                    break
                prev = rng.randint(2, hi)
                head.append(prev)
                used += prev * span
            if len(head) != stages - 1:
                continue
            cand = self._solve_last(layers, head, encoder)
            if cand is not None:
                return cand
        return None

    def neighbour(self, rng: random.Random, cand: Candidate, tries: int = 2000) -> Candidate | None:
        """A random feasible candidate one small move away from ``cand``."""
        for _ in range(tries):
            layers = list(cand.layers)
            head = list(cand.keep[:-1])
            encoder = cand.encoder
            move = rng.randrange(3)
            if move == 0:  # move one stage's layer
                s = rng.randrange(len(layers))
                layers[s] += rng.choice((-2, -1, 1, 2))
                if not (1 <= layers[s] < self.num_layers) or len(set(layers)) != len(layers):
                    continue
                layers.sort()
            elif move == 1 and head:  # move one budget (the last one follows)
                s = rng.randrange(len(head))
                head[s] = max(1, head[s] + rng.choice((-1, 1)) * rng.randint(1, max(1, head[s] // 4)))
                top = self.n if encoder is None else encoder
                if any(b >= a for a, b in zip([top] + head, head)):
                    continue
            elif encoder is not None:  # move the encoder budget
                encoder = encoder + rng.choice((-1, 1)) * rng.randint(1, max(1, encoder // 4))
                if not 2 <= encoder < self.n or (head and head[0] >= encoder):
                    continue
            else:
                continue
            new = self._solve_last(tuple(layers), head, encoder)
            if new is not None and new != cand:
                return new
        return None


def published_default(family: str, num_layers: int, n: int, encoder: bool) -> tuple[str, Any]:
    """The family's default (w/ VE when ``encoder``; :func:`.schedules.default_preset`): the
    preset set for the nearest depth, scaled to ``num_layers`` layers and ``n`` tokens when it
    was set for another depth; returns ``(label, PioConfig)``. Qwen2-VL, Qwen3-VL and LLaVA-OneVision have
    only defaults with the encoder side, which then stand in for a search without it."""
    label, fields = default_preset(family, num_layers, encoder=encoder, visual_tokens=n)
    return label, make_config(**fields)


def search(vlm, samples: Sequence[Sample], target: float, *, stages: Sequence[int] = (1, 2, 3),
           encoder: bool = False, budget: int = 24, seed: int = 0, objective_name: str = "kl",
           batch_size: int = 4, max_new_tokens: int = 16, tau: float = 0.8, num_positions: int = 4,
           progress: bool = True, out: str | None = None) -> dict[str, Any]:
    """Searches a schedule meeting ``target`` retention exactly; returns (and writes) the report.

    Args:
        vlm: a :class:`~.vlm.LocalVLM`; samples: the calibration set.
        target: average retention in (0, 1), e.g. ``1/9``.
        stages: numbers of decoder stages to draw from; encoder: add an encoder-side budget.
        budget: schedules evaluated (besides the published default).
        objective_name: ``kl`` (first-token KL), ``drift`` or ``disagreement`` (needs generation).
        out: folder for ``best_config.json`` (the PioConfig fields) and ``tune.json`` (everything).

    Raises:
        ValueError: bad arguments, or no schedule meets the target exactly.
    """
    from tqdm import tqdm

    if not 0.0 < target < 1.0:
        raise ValueError(f"target must lie in (0, 1), got {target}")
    if budget < 2:
        raise ValueError(f"budget must be >= 2, got {budget}")
    if objective_name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective_name!r}")
    stages = tuple(sorted(set(int(s) for s in stages)))
    if not stages or stages[0] < 1:
        raise ValueError(f"stages must be positive ints, got {list(stages)}")
    generate = objective_name == "disagreement"
    reference = reference_outputs(vlm, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  generate=generate, progress=progress)
    counts = [st.visual_tokens for st in reference.stats]
    if min(counts) < 4:
        raise ValueError(f"every calibration sample needs >= 4 visual tokens, got {sorted(set(counts))}")
    n = int(statistics.median_low(counts))
    num_layers = vlm.num_layers
    total = round(target * n * num_layers)
    space = SearchSpace(n=n, num_layers=num_layers, total=total, stages=stages, encoder=encoder,
                        ints=len(set(counts)) == 1)
    rng = random.Random(seed)

    def evaluate(cand_config, label: str) -> dict[str, Any]:
        run = fidelity(vlm, samples, cand_config, reference, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       generate=generate, progress=False, name=label)
        run.pop("per_sample")
        run["objective"] = objective(run, objective_name)
        run["token_layers"] = sum(schedule_tokens_per_layer(cand_config, n, num_layers))
        return run

    evaluated: list[dict[str, Any]] = []
    seen: set[Candidate] = set()
    best: tuple[float, int] | None = None
    bar = tqdm(total=budget, desc="pio-tune", disable=not progress)
    n_random = max(1, budget // 2)
    while len(evaluated) < budget:
        phase = "random" if len(evaluated) < n_random or best is None else "local"
        cand = None
        for _ in range(20):
            cand = space.sample(rng) if phase == "random" else space.neighbour(rng, evaluated[best[1]]["candidate"])
            if cand is not None and cand not in seen:
                break
            cand = None
        if cand is None and phase == "local":
            cand = space.sample(rng)
            cand = None if cand in seen else cand
        if cand is None:
            break  # the space is exhausted (tiny models)
        seen.add(cand)
        run = evaluate(space.config(cand, tau, num_positions), f"candidate {len(evaluated)}")
        run.update(phase=phase, candidate=cand)
        evaluated.append(run)
        if best is None or run["objective"] < best[0]:
            best = (run["objective"], len(evaluated) - 1)
        bar.update(1)
        bar.set_postfix(best=f"{best[0]:.4g}")
    bar.close()
    if best is None:
        raise ValueError(f"no schedule meets {total} token-layers ({n} tokens x {num_layers} layers x {target}) "
                         f"exactly with stages {list(stages)}; try other stages or encoder")
    label, default_config = published_default(vlm.family, num_layers, n, encoder)
    default = evaluate(default_config, label)
    default["retention_at_n"] = default["token_layers"] / (n * num_layers)
    best_run = evaluated[best[1]]
    best_config = space.config(best_run["candidate"], tau, num_positions)
    for run in evaluated:
        run["candidate"] = run.pop("candidate").__dict__
    report = {
        "target": target, "visual_tokens": n, "visual_tokens_seen": sorted(set(counts)), "num_layers": num_layers,
        "target_token_layers": total, "retention": total / (n * num_layers), "objective": objective_name,
        "seed": seed, "budget": budget, "stages": list(stages), "encoder": encoder,
        "budgets_are": "counts" if space.ints else "fractions of each stage's input",
        "best": {**{k: v for k, v in best_run.items()}, "config": describe(best_config)},
        "published_default": default, "candidates": evaluated,
    }
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "best_config.json"), "w") as f:
            json.dump(describe(best_config), f, indent=2)
        with open(os.path.join(out, "tune.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report
