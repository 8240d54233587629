"""The lmms-eval model plugin: ``lmms-eval --model pio --model_args pretrained=PATH,...``.

Registered through the ``lmms_eval.models`` entry point (``pio_kernels.eval.lmms_plugin:manifest``,
model name ``pio``, alias ``pio_vlm``), so an installed package is all lmms-eval needs.

``--model_args`` (comma separated; a list in brackets keeps its commas, see
:mod:`.schedules` for the syntax):

=========================  =======================================================================
``pretrained=PATH``        a local checkpoint folder (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision,
                           Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense or MoE; the family is detected
                           from its config); nothing is downloaded
``dtype=auto``             ``auto`` (the checkpoint's), ``float32``, ``bfloat16``, ``float16``
``attn_implementation``    ``sdpa`` (default), ``eager``, ``flash_attention_2``
``device``                 default ``cuda`` when available (``cuda:LOCAL_RANK`` per process), else ``cpu``
``batch_size``             requests per forward (``--batch_size`` sets it too); padded on the left
``preset=NAME``            a preset (``llava-1.5-ve``, ``llava-1.5``, ``qwen2.5-vl-ve``,
                           ``qwen2-vl-ve``, ``qwen3-vl-ve``, ``llava-onevision-ve``, ...),
                           ``default`` (the family's preset for the model's depth, scaled to
                           it when none is set for it) or ``stock`` (the unpruned model)
``layers=[1,10,15]``       PioConfig fields; they override the preset's
``keep=[92,54,22]``
``encoder_keep=96``        ``none`` turns the preset's off
``tau``, ``num_positions``
``scoring=saliency``       a rule of :mod:`pio_kernels.scoring` (``random``, ``attention``, ``norm``)
``selection=nms``          ``nms``, ``topk`` or ``uniform``
``seed=0``                 seed of the ``random`` rule
``max_new_tokens=128``     default generation length when the task does not set one
=========================  =======================================================================

With neither a preset nor ``layers`` the stock model runs (the unpruned baseline).

Every response carries, in the logged samples' ``token_counts``, a ``pio`` entry: visual tokens
in, visual tokens kept per stage, retained fraction (average over decoder layers), TFLOPs of
the visual tokens by the SPEC section 6 formula (and the stock model's), and per-stage selection
milliseconds (the batch's time over its samples). At the end of the run the plugin gathers
them from every process and logs their means, overall and per task, into the results JSON's
``throughput`` section (``avg_pio_retained_fraction``, ``avg_pio_tflops``, ...).

Data parallel: ``torchrun --nproc_per_node N -m lmms_eval ...`` (CPU: gloo) or
``accelerate launch --num_processes N -m lmms_eval ...`` on GPUs; every process loads the
model on its own device and lmms-eval shards the requests.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from .schedules import make_config
from .vlm import LocalVLM

__all__ = ["PioLMM", "PioTokenCounts", "manifest", "summarize"]


def manifest():
    """The entry point's payload. A function, so that importing this module never imports
    ``lmms_eval.models`` (whose import loads the entry points, this one included)."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id="pio", simple_class_path="pio_kernels.eval.lmms_plugin.PioLMM",
                         aliases=("pio_vlm",))


@dataclass
class PioTokenCounts(TokenCounts):
    """lmms-eval's token counts plus this sample's pio accounting (logged as ``pio``)."""

    pio: dict | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.pio is not None:
            out["pio"] = self.pio
        return out


def summarize(records: list[dict]) -> dict[str, float]:
    """Means of the per-sample pio accounting, overall (``pio_*``) and per task (``pio_<task>_*``).

    ``records``: ``{"task": ..., "pio": SampleStats.to_dict()}`` per response.
    """
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r["pio"])

    def means(items: list[dict]) -> dict[str, float]:
        out = {"responses": float(len(items))}
        for key in ("retained_fraction", "tflops", "tflops_stock"):
            values = [i[key] for i in items if i.get(key) is not None]
            if values:
                out[key] = sum(values) / len(values)
        stock = sum(i["tflops_stock"] for i in items)
        if stock > 0:
            out["flops_fraction"] = sum(i["tflops"] for i in items) / stock
        ms = [sum(i["selection_ms"]) for i in items if i.get("selection_ms")]
        if ms:
            out["selection_ms"] = sum(ms) / len(ms)
        visual = [i["visual_tokens"] for i in items]
        if visual:
            out["visual_tokens"] = sum(visual) / len(visual)
        return out

    summary = {f"pio_{k}": v for k, v in means([r["pio"] for r in records]).items()}
    for task, items in sorted(by_task.items()):
        summary.update({f"pio_{task}_{k}": v for k, v in means(items).items()})
    return summary


class PioLMM(lmms):
    """lmms-eval model: a local VLM with a pio schedule (or none). See the module docstring."""

    is_simple = True

    def __init__(self, pretrained: str, dtype: str = "auto", attn_implementation: str | None = "sdpa",
                 device: str | None = None, batch_size: int | str = 1, preset: str | None = None,
                 layers: Any = None, keep: Any = None, encoder_keep: Any = None, tau: float | None = None,
                 num_positions: int | None = None, scoring: str | None = None, selection: str | None = None,
                 seed: int | None = None, max_new_tokens: int = 128, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args {sorted(unknown)} for the pio model")
        if not pretrained or not os.path.isdir(str(pretrained)):
            raise ValueError(f"pretrained must be a local checkpoint folder, got {pretrained!r}")
        fields = dict(layers=layers, keep=keep, encoder_keep=encoder_keep, tau=tau, num_positions=num_positions,
                      scoring=scoring, selection=selection, seed=seed)
        if preset != "default":  # a bad schedule fails before the weights load
            self.pio_config = make_config(preset, **fields)
        world = int(os.environ.get("WORLD_SIZE", 1))
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = world
        if device is None:
            local = int(os.environ.get("LOCAL_RANK", 0))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        if world > 1:
            from accelerate import Accelerator
            self.accelerator = Accelerator()  # joins (or starts) the process group lmms-eval uses
        self.vlm = LocalVLM.load(str(pretrained), dtype=dtype, attn_implementation=attn_implementation,
                                 device=device)
        if preset == "default":
            self.pio_config = make_config(preset, family=self.vlm.family, num_layers=self.vlm.num_layers, **fields)
        self.vlm.apply(self.pio_config)
        self.batch_size_per_device = int(batch_size)
        if self.batch_size_per_device < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self._records: list[dict] = []
        self._elapsed = 0.0   # seconds in the model, this process
        self._generated = 0   # tokens generated, this process

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def device(self) -> torch.device:
        return self.vlm.device

    @property
    def model(self):
        return self.vlm.model

    @property
    def tokenizer(self):
        return self.vlm.tokenizer

    @property
    def config(self):
        return self.vlm.model.config

    # -- helpers ---------------------------------------------------------------------------
    def _visuals(self, request: Instance) -> list:
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        for v in visuals:
            if not hasattr(v, "convert"):
                raise ValueError(f"pio: only image inputs are supported, got {type(v).__name__} in task {task}")
        return [v.convert("RGB") for v in visuals]

    def _batches(self, requests: list[Instance], key) -> list[list[int]]:
        """Indices of ``requests`` grouped by ``key`` and cut into batches of similar length."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[key(r)].append(i)
        out = []
        for _, idx in groups.items():
            idx.sort(key=lambda i: -len(str(requests[i].args[0])))
            out += [idx[s:s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
        return out

    def _record(self, request: Instance, stats) -> dict:
        info = stats.to_dict()
        if not (request.metadata or {}).get("__padding_only__"):
            self._records.append({"task": request.task_name, "doc_id": request.doc_id, "pio": info})
        return info

    def _progress(self, total: int, desc: str):
        from tqdm import tqdm
        return tqdm(total=total, disable=self.rank != 0, desc=desc)

    # -- lmms-eval API ---------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)

        def key(r):
            return json.dumps(r.args[1], sort_keys=True, default=str)

        bar = self._progress(len(requests), "pio generate")
        for idx in self._batches(requests, key):
            gen = dict(requests[idx[0]].args[1] or {})
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            visuals = [self._visuals(requests[i]) for i in idx]
            prompts = [self.vlm.prompt(str(requests[i].args[0]), len(v)) for i, v in zip(idx, visuals)]
            start = time.perf_counter()
            texts, stats = self.vlm.generate(prompts, visuals, max_new_tokens=int(gen.get("max_new_tokens",
                                                                                          self.max_new_tokens)),
                                             until=until, temperature=float(gen.get("temperature", 0) or 0),
                                             top_p=gen.get("top_p"), num_beams=int(gen.get("num_beams", 1) or 1))
            self._elapsed += time.perf_counter() - start
            for i, text, st in zip(idx, texts, stats):
                info = self._record(requests[i], st)
                generated = len(self.tokenizer(text, add_special_tokens=False).input_ids)
                self._generated += generated
                counts = PioTokenCounts(input_tokens=st.input_tokens, output_tokens=generated, pio=info)
                results[i] = GenerationResult(text=text, token_counts=counts)
            bar.update(len(idx))
        bar.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(loss, greedy)`` in lmms-eval's convention: ``loss`` is the mean negative
        log-likelihood of the continuation's tokens (what its LLaVA models return, and what its
        ``multiple_choice`` scoring takes the argmin of), ``greedy`` whether greedy decoding
        produces the continuation.

        lmms-eval 0.7.3 turns a bare tuple into a string; wrapped in a GenerationResult it reaches
        the metric as the tuple."""
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = self._progress(len(requests), "pio loglikelihood")
        for idx in self._batches(requests, key=lambda r: r.task_name):
            visuals, prompts, conts = [], [], []
            for i in idx:
                context, target, _, doc_id, task, split = requests[i].args
                cont = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                v = self._visuals(requests[i])
                visuals.append(v)
                prompts.append(self.vlm.prompt(str(context), len(v)))
                conts.append(str(cont))
            start = time.perf_counter()
            scores, stats = self.vlm.loglikelihood(prompts, conts, visuals)
            self._elapsed += time.perf_counter() - start
            for i, score, st in zip(idx, scores, stats):
                info = self._record(requests[i], st)
                loss = -score.logprob / score.tokens
                counts = PioTokenCounts(input_tokens=st.input_tokens, pio=info)
                results[i] = GenerationResult(text=(loss, score.greedy), token_counts=counts)
            bar.update(len(idx))
        bar.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("pio: multi-round generation is not supported")

    def clean(self) -> None:
        """End of the requests: gathers every process's pio accounting and logs its means
        (rank 0) into the results' ``throughput`` section; the model stays loaded."""
        mine = {"records": self._records, "elapsed": self._elapsed, "generated": self._generated}
        parts = [mine]
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * self._world_size
            torch.distributed.all_gather_object(parts, mine)
        records = [r for p in parts for r in p["records"]]
        if self.rank == 0 and records:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics
            elapsed = sum(p["elapsed"] for p in parts)
            generated = sum(p["generated"] for p in parts)
            log_metrics(total_elapsed_time=elapsed, total_gen_tokens=generated,
                        avg_speed=generated / elapsed if elapsed > 0 else 0.0, additional_metrics=summarize(records))
        self._records, self._elapsed, self._generated = [], 0.0, 0
