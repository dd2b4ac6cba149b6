"""``LLM``: offline batch generation on top of ``LLMEngine``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pageant.engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from pageant.engine.config import EngineConfig
from pageant.engine.engine import LLMEngine
from pageant.engine.exceptions import InvalidRequestError
from pageant.engine.lora import LoRARequest
from pageant.engine.outputs import EmbeddingRequestOutput, RequestOutput
from pageant.engine.pooling import PoolingParams
from pageant.engine.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int] | dict


def _final_only(params: list) -> list:
    """The sampling params with ``output_kind`` FINAL_ONLY (as vLLM's ``LLM`` does: only the
    finished outputs are returned, so the engine builds no per-step ones); one copy per distinct
    object, the caller's left unchanged."""
    copies: dict[int, Any] = {}
    out = []
    for p in params:
        if isinstance(p, SamplingParams) and p.output_kind is not RequestOutputKind.FINAL_ONLY:
            if id(p) not in copies:
                copies[id(p)] = p.clone(output_kind=RequestOutputKind.FINAL_ONLY)
            p = copies[id(p)]
        out.append(p)
    return out


class LLM:
    """Generate for many prompts at once; outputs come back in the prompts' order.

    ``LLM(model=..., **kwargs)`` takes the fields of ``EngineConfig`` (dtype, device,
    max_num_seqs, max_num_batched_tokens, block_size, num_kv_blocks, max_model_len, seed,
    kv_cache_memory_gib, gpu_memory_utilization, attention_backend, ...).
    """

    def __init__(self, model: str, **kwargs: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        cache_salt: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion. ``sampling_params``: one for all or one per prompt;
        ``lora_request``: one adapter for all, or one per prompt (None = the base model);
        ``cache_salt``: one for all or one per prompt (prefix caching shares blocks only between
        requests with the same salt)."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise InvalidRequestError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        params = _final_only(params)
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise InvalidRequestError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise InvalidRequestError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts")
        salts = list(cache_salt) if isinstance(cache_salt, (list, tuple)) else [cache_salt] * len(prompts)
        if len(salts) != len(prompts):
            raise InvalidRequestError(f"got {len(salts)} cache salts for {len(prompts)} prompts")
        for p in params:  # a constraint that does not compile fails here, before anything is queued
            if isinstance(p, SamplingParams) and p.structured_outputs is not None:
                try:
                    self.engine.structured_outputs.validate(p.structured_outputs)
                except ValueError as exc:
                    raise InvalidRequestError(str(exc)) from None
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p, prio, lora, salt in zip(ids, prompts, params, priorities, loras, salts):
                self.engine.add_request(rid, prompt, p, priority=prio, lora_request=lora, cache_salt=salt)
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(ids)
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm, leave=False) as bar:
            try:
                while len(finished) < len(ids) and self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished and out.request_id in wanted:
                            finished[out.request_id] = out
                            bar.update(1)
            except BaseException:
                self.engine.abort_request(ids)
                raise
        return [finished[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.engine.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """Embed every prompt (``runner="pooling"`` engines); ``.outputs.embedding`` per prompt, in order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = pooling_params or PoolingParams()
        ids = [f"embed-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt in zip(ids, prompts):
                self.engine.add_request(rid, prompt, params, lora_request=lora_request)
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def beam_search(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: BeamSearchParams,
        lora_request: LoRARequest | None = None,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search for every prompt (see ``pageant.engine.beam_search``); per prompt, its
        hypotheses best first, each with ``.tokens`` (prompt + generated), ``.text``, ``.cum_logprob``.
        All live beams of all prompts run as one batch per step; enable prefix caching so beams share
        their prefix blocks instead of re-prefilling them."""
        if not isinstance(params, BeamSearchParams):
            raise InvalidRequestError("params must be a BeamSearchParams")
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        eos, limit = self.engine.tokenizer.eos_token_ids, self.engine.config.max_model_len
        searches = []
        for prompt in prompts:
            _, ids = self.engine._prompt_ids(prompt)
            if not ids or len(ids) + params.max_tokens > limit:
                raise InvalidRequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) must "
                                          f"fit the model's context of {limit} tokens")
            try:
                searches.append(BeamSearch(ids, params, eos))
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from None
        with tqdm(total=params.max_tokens, desc="Beam search", unit="tok", disable=not use_tqdm, leave=False) as bar:
            while not all(s.done for s in searches):
                todo = [(s, beam) for s in searches if not s.done for beam in s.live()]
                sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                    logprobs=max(s.beams_to_keep for s, _ in todo))
                outs = self.generate([{"prompt_token_ids": beam.tokens} for _, beam in todo], sp, use_tqdm=False,
                                     lora_request=lora_request)
                tops: dict[int, list[dict[int, float]]] = {}
                for (search, _), out in zip(todo, outs):
                    top = out.outputs[0].logprobs[0]
                    best = sorted(top.items(), key=lambda kv: -kv[1].logprob)[: search.beams_to_keep]
                    tops.setdefault(id(search), []).append({t: lp.logprob for t, lp in best})
                for search in {id(s): s for s, _ in todo}.values():
                    search.advance(tops[id(search)])
                bar.update(1)
        results = [s.output() for s in searches]
        for result, search in zip(results, searches):
            for seq in result.sequences:
                seq.text = self.engine.tokenizer.decode(seq.tokens[search.num_prompt_tokens:])
        return results

    def reset_prefix_cache(self) -> None:
        """Drop every prefix-cache entry."""
        self.engine.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor/pipeline-parallel engine (also done when the LLM is
        garbage-collected or the interpreter exits); the LLM cannot generate afterwards."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
