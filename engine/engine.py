"""``LLMEngine``: requests in, one scheduler step + forward + sampling per ``step()``, outputs out.

Single-threaded: every method is called from one thread. Data flows as explicit objects:
``Scheduler.schedule() -> SchedulerOutput -> ModelRunner.prepare() -> ModelInput ->
ModelRunner.execute() -> ModelOutput -> sampler -> SamplerOutput -> OutputProcessor``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Iterable
from typing import Any

import torch

from pageant.engine.adapters import LoRAManager, LoRAModelSpec
from pageant.engine.block_manager import BlockManager
from pageant.engine.config import EngineConfig, ModelConfig, resolve_max_model_len
from pageant.engine.engine_lora import EngineLoRA
from pageant.engine.exceptions import EngineStepError, InvalidRequestError
from pageant.engine.loader import resolve_model_path
from pageant.engine.multimodal.processor import make_processor, prompt_inputs
from pageant.engine.lora import LoRARequest
from pageant.engine.output_processor import OutputProcessor
from pageant.engine.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestMetrics, RequestOutput
from pageant.engine.pooling import (PoolingParams, PoolingState, matryoshka_dimensions, new_pooling_state, pool_step,
                                    resolve_pooler_config)
from pageant.engine.structured_outputs.manager import GrammarState, StructuredOutputManager
from pageant.engine.prefix_cache import root_hash
from pageant.engine.sampler import SamplingBatch, sample
from pageant.engine.sampling_params import SamplingParams
from pageant.engine.scheduler import Scheduler
from pageant.engine.sequence import Request, make_generator
from pageant.engine.spec_decode import target_runner_class
from pageant.engine.spec_decode.decoder import SpecDecoder
from pageant.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def _generation_eos_ids(path: pathlib.Path) -> tuple[int, ...]:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return ()
    eos = json.loads(gen.read_text()).get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))


class LLMEngine(EngineLoRA):
    """The online engine. See ``/work/notes/engine_interface.md`` for the contract."""

    def __init__(self, config: EngineConfig):
        import pageant.kernels

        path = resolve_model_path(config.model, config.revision, config.download_dir)
        model_config = ModelConfig.from_pretrained(path)
        max_model_len = resolve_max_model_len(config.max_model_len, model_config)
        backend = config.attention_backend or ("triton" if config.device.startswith("cuda") else "torch")
        eos_ids = model_config.eos_token_ids + _generation_eos_ids(path)
        self.tokenizer = Tokenizer(config.tokenizer or path, extra_eos_ids=eos_ids)
        self.model_name = config.served_model_name or (
            path.name if pathlib.Path(config.model).expanduser().is_dir() else config.model
        )
        self.lora_manager = LoRAManager(
            LoRAModelSpec.from_model_config(model_config), max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank, max_cpu_loras=config.max_cpu_loras, device=config.device,
            dtype=getattr(torch, config.dtype), backend=backend, adapter_root=config.allowed_lora_root,
            reserved_names=(self.model_name,),
        ) if config.enable_lora else None
        if config.world_size > 1:  # tensor/pipeline parallel: rank 0 here, the other ranks in workers
            from pageant.engine.distributed.executor import DistributedRunner

            self.runner = DistributedRunner(config, model_config, path, backend, max_model_len, self.lora_manager)
        else:
            self.runner = target_runner_class(config)(config, model_config, path, pageant.kernels.get_ops(backend),
                                                      max_model_len, self.lora_manager)
        self.config = dataclasses.replace(
            config, max_model_len=max_model_len, num_kv_blocks=self.runner.num_kv_blocks, attention_backend=backend
        )
        self.model_config = model_config
        self.vocab_size = model_config.vocab_size
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size,
                                          enable_caching=config.enable_prefix_caching)
        self._lora_identities: dict[str, bytes] = {}  # adapter name -> digest of its files (prefix cache)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_loras if config.enable_lora else 0)
        self.outputs = OutputProcessor(self.tokenizer, max_model_len)
        self.requests: dict[str, Request] = {}
        self.generator = torch.Generator(device=self.runner.device)
        self.generator.manual_seed(config.seed)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.embedding_requests_total = 0
        self.pooler = resolve_pooler_config(path, config.pooler_config) if config.runner == "pooling" else None
        self.matryoshka_dimensions = matryoshka_dimensions(model_config.raw)
        self.mm_processor = make_processor(path, model_config, config)  # None: a text-only model
        self._structured: StructuredOutputManager | None = None  # made on the first constrained request
        self.spec_decode = (SpecDecoder.build(self, pageant.kernels.get_ops(backend))  # speculative decoding
                            if config.speculative_config is not None else None)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "LLMEngine":
        return cls(EngineConfig(model=model, **kwargs))

    # ------------------------------------------------------------------ requests
    def _prompt_ids(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise InvalidRequestError("prompt token ids must be integers")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt token ids out of vocabulary [0, {self.vocab_size}): {bad[:5]}")
            return None, list(prompt)
        raise InvalidRequestError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | PoolingParams, *,
                    arrival_time: float | None = None, priority: int = 0,
                    lora_request: LoRARequest | None = None, cache_salt: str | None = None) -> None:
        """Validate and queue a request; raises ``InvalidRequestError`` if it can never run.
        ``cache_salt``: with prefix caching, only requests with the same salt share cached blocks.
        ``PoolingParams`` make an embedding request (``runner="pooling"`` engines only)."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string")
        if request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        pooling = self._pooling_state(params)
        if pooling is not None:
            params = SamplingParams(max_tokens=1)  # budget and blocks for the prompt only; never sampled
        elif not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams or PoolingParams")
        elif self.pooler is not None:
            raise InvalidRequestError("this engine runs the pooling runner (embeddings): it does not generate text")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError("priority must be an integer")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError("cache_salt must be a non-empty string if provided")
        lora_name = self._lora_name(lora_request)
        mm_inputs = prompt_inputs(self.mm_processor, prompt)  # images: expanded ids + items (None: text only)
        text, ids = self._prompt_ids(prompt) if mm_inputs is None else (prompt.get("prompt"), mm_inputs.prompt_token_ids)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        limit = self.config.max_model_len
        if pooling is not None and len(ids) > limit:
            raise InvalidRequestError(f"the input has {len(ids)} tokens; this model's context is {limit} tokens")
        if pooling is None and len(ids) >= limit:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; this model's context is {limit} tokens, "
                "leaving no room for output"
            )
        if pooling is None and params.max_tokens is None:
            params = params.clone(max_tokens=limit - len(ids), min_tokens=min(params.min_tokens, limit - len(ids)))
        if pooling is None and len(ids) + params.max_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {limit} tokens"
            )
        needed = self.block_manager.blocks_for_tokens(len(ids) + params.max_tokens - 1)
        if needed > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"the request needs {needed} KV-cache blocks but the pool has only "
                f"{self.block_manager.num_blocks}; lower max_tokens or the prompt length"
            )
        if params.logit_bias and any(not 0 <= t < self.vocab_size for t in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        if any(t >= self.vocab_size for t in params.stop_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {self.vocab_size})")
        request = Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            priority=priority,
            metrics=RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time),
            eos_token_ids=self.tokenizer.eos_token_ids,
            lora_name=lora_name,
            cache_root=root_hash(self._lora_identities.get(lora_name), cache_salt),
            pooling=pooling,
            grammar=self._grammar_state(params),
            mm_inputs=mm_inputs,
        )
        request.new_sequence(0, list(ids), make_generator(params.seed, 0, self.runner.device))
        if lora_name is not None:
            self.lora_manager.acquire(lora_name)
        self.requests[request_id] = request
        self.scheduler.add_request(request)

    @property
    def structured_outputs(self) -> StructuredOutputManager:
        """The structured-output manager (compile cache and thread), created on first use."""
        if self._structured is None:
            cfg = self.config.structured_outputs_config or {}
            self._structured = StructuredOutputManager(
                self.tokenizer.hf_tokenizer, self.vocab_size, sorted(self.tokenizer.eos_token_ids),
                backend=cfg.get("backend", "auto"), disable_any_whitespace=bool(cfg.get("disable_any_whitespace")),
                reasoning_parser=cfg.get("reasoning_parser"))
        return self._structured

    def _grammar_state(self, params: SamplingParams) -> GrammarState | None:
        constraint = getattr(params, "structured_outputs", None)
        if constraint is None:
            return None
        state = self.structured_outputs.state(constraint)
        if state.error is not None:  # already known bad (cached)
            raise InvalidRequestError(state.error)
        return state

    def _drop_failed_grammars(self) -> list[RequestOutput]:
        """Requests whose constraint failed to compile after they were queued: aborted, reported."""
        failed = [s.request for s in self.scheduler.waiting if s.request.grammar is not None and s.request.grammar.error]
        outputs = []
        for request in dict.fromkeys(failed):
            logger.warning("request %s: %s", request.request_id, request.grammar.error)
            self.abort_request(request.request_id)
            out = self.outputs.make_output(request)
            if out is not None:
                outputs.append(out)
        return outputs

    def _pooling_state(self, params: Any) -> PoolingState | None:
        """The pool of an embedding request (``PoolingParams``), checked against this engine."""
        if not isinstance(params, PoolingParams):
            return None
        if self.pooler is None:
            raise InvalidRequestError("embeddings need an engine started with runner='pooling' (--runner pooling)")
        try:
            return new_pooling_state(params, self.pooler, self.matryoshka_dimensions, self.model_config.hidden_size)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Drop requests now (their KV blocks go back to the pool); unknown ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            for seq in request.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish_reason = "abort"
            request.metrics.finished_time = time.time()
            self._release_lora(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def fatal_error(self) -> str | None:
        """Why this engine can run no more steps (a tensor/pipeline-parallel rank died or hung), else None."""
        return getattr(self.runner, "failure", None)

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor/pipeline-parallel engine (no-op on one process)."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration, one forward, one sampling; outputs of every request that got a
        token or finished. On a model/sampling failure, frees that batch's requests and raises
        ``EngineStepError`` naming them."""
        dropped = self._drop_failed_grammars() if self._structured is not None else []
        so = self.spec_decode.schedule(self.scheduler) if self.spec_decode is not None else self.scheduler.schedule()
        if so.is_empty:
            return dropped
        rows = [seq for seq, _ in so.sample_rows]
        spec = self.spec_decode if self.spec_decode is not None and self.spec_decode.speculating(so) else None
        try:
            if spec is not None:
                spec.draft(so, self.generator)  # the draft model fills its proposals (n-gram: no-op)
            inp = self.runner.prepare(so)
            # host -> device copies of the sampling inputs before the forward is queued, so they do
            # not wait for it; the only sync of the step is the sampler reading the tokens back
            batch = SamplingBatch.build(rows, self.vocab_size, self.runner.device) if rows and spec is None else None
            mask = self._structured.bitmask(rows) if self._structured is not None and batch is not None else None
            out = self.runner.execute(so, inp)
            if spec is not None:  # several tokens per row: verification (rejection sampling)
                sampled, completed = spec.verify(so, out.logits, self.vocab_size, self.generator, self._structured)
            else:
                sampled = sample(out.logits, batch, self.generator, mask) if rows else None
                completed = self._structured.accept(rows, sampled.token_ids) if mask is not None else []
            pooled = pool_step(so.scheduled, out.hidden, self.scheduler) if out.hidden is not None else []
        except Exception as exc:
            self.block_manager.uncache(so.cached_blocks)  # their KV may never have been written
            ids = list(dict.fromkeys([s.seq.request_id for s in so.scheduled] + [s.request_id for s in rows]))
            logger.exception("engine step failed for requests %s", ids)
            self.abort_request(ids)
            if self.fatal_error is not None:  # a rank is gone: no later step can run either
                raise
            raise EngineStepError(ids, exc) from exc
        self.prompt_tokens_total += sum(len(s.request.prompt_token_ids) for s in rows  # (a request's first token)
                                        if len(s.token_ids) == len(s.request.prompt_token_ids) and s.index == 0)
        self.generation_tokens_total += len(rows)
        if out.prompt_logits is not None:
            self.outputs.add_prompt_logprobs(so, inp, out.prompt_logits)
        results: list = dropped
        for request in pooled:  # embedding requests whose prompt is done
            request.metrics.finished_time = time.time()
            self.prompt_tokens_total += request.num_prompt_tokens
            self.embedding_requests_total += 1
            if self.requests.pop(request.request_id, None) is not None:
                self._release_lora(request)
            results.append(EmbeddingRequestOutput(request.request_id, list(request.prompt_token_ids),
                                                  EmbeddingOutput(request.pooling.embedding), True, request.metrics))
        touched = spec.apply(self, so, sampled) if spec is not None else (
            self.outputs.process_samples(so, sampled, self.scheduler) if rows else [])
        for seq in completed:  # the constraint is complete: the request ends as at a stop
            if seq.finish_reason is None:
                self.outputs._finish(seq, "stop", None)  # (all its text is shown)
                self.scheduler.finish(seq)
        now = time.time()
        for request in touched:
            if request.is_finished:
                request.metrics.finished_time = now
                if self.requests.pop(request.request_id, None) is not None:
                    self._release_lora(request)
            out = self.outputs.make_output(request)
            if out is not None:  # (FINAL_ONLY requests report only when they finish)
                results.append(out)
        return results

    def reset_prefix_cache(self) -> None:
        """Drop every prefix-cache entry (e.g. after changing what a cached prefix should mean);
        requests in flight are not affected."""
        self.block_manager.reset_cache()

    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        running = {s.request for s in self.scheduler.running}  # (requests hash by identity: cheap per step)
        waiting = {s.request for s in self.scheduler.waiting} - running
        running_loras = {r.lora_name for r in running} - {None}
        waiting_loras = {s.request.lora_name for s in self.scheduler.waiting} - {None}
        return {
            "num_kv_blocks": bm.num_blocks,
            "num_free_kv_blocks": bm.num_free_blocks,
            "kv_cache_usage": bm.usage,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_requests_running": len(running),
            "num_requests_waiting": len(waiting),
            "prompt_tokens_total": self.prompt_tokens_total,
            "embedding_requests_total": self.embedding_requests_total,
            "runner": self.config.runner,
            "generation_tokens_total": self.generation_tokens_total,
            "block_size": bm.block_size,
            "enable_prefix_caching": bm.enable_caching,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "num_cached_kv_blocks": bm.num_cached_blocks,
            "running_lora_adapters": sorted(running_loras),
            "waiting_lora_adapters": sorted(waiting_loras),
            "max_lora": self.config.max_loras if self.config.enable_lora else 0,
            **(self.spec_decode.stats.as_dict() if self.spec_decode is not None else {}),
        }

