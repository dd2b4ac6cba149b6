"""Turns sampled tokens into request state: stop checks, detokenized text, logprobs, outputs."""

from __future__ import annotations

import time

import torch

from pageant.engine.detokenizer import detokenize_incrementally, find_stop_string, held_back_chars
from pageant.engine.model_runner import ModelInput
from pageant.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pageant.engine.sampler import SamplerOutput, prompt_logprobs
from pageant.engine.scheduler import Scheduler, SchedulerOutput
from pageant.engine.sequence import Request, Sequence
from pageant.engine.tokenizer import Tokenizer


class OutputProcessor:
    """Applies one step's samples to their sequences and builds ``RequestOutput``s.

    Stop rules, in order, once ``min_tokens`` outputs exist: an eos token (unless
    ``ignore_eos``) or a ``stop_token_ids`` token ends with "stop" (its text is not added);
    a stop string in the new text ends with "stop" (the text is cut before it, or after it with
    ``include_stop_str_in_output``). Then ``max_tokens`` or the context limit end with "length".
    Stop-string matching reads only the new text plus the longest stop string's length (see
    ``detokenizer.stop_search_start``), so its cost per token does not grow with the output.
    """

    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._token_text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _logprob_dict(self, ids: list[int], lps: list[float], chosen: int, chosen_lp: float,
                      chosen_rank: int) -> dict[int, Logprob]:
        out = {chosen: Logprob(chosen_lp, chosen_rank, self.token_text(chosen))}
        for r, (tid, lp) in enumerate(zip(ids, lps), start=1):
            if tid not in out:
                out[tid] = Logprob(lp, r, self.token_text(tid))
        return out

    # ------------------------------------------------------------------ prompt logprobs
    def add_prompt_logprobs(self, so: SchedulerOutput, inp: ModelInput, logits: torch.Tensor) -> None:
        k = max(so.scheduled[i].seq.request.params.prompt_logprobs for i, _, _ in inp.prompt_spans)
        lps, targets, ranks, top_ids, top_lps = prompt_logprobs(logits, inp.prompt_targets, k)
        row = 0
        for i, first, count in inp.prompt_spans:
            request = so.scheduled[i].seq.request
            if request.prompt_logprobs is None:
                request.prompt_logprobs = [None]
            want = request.params.prompt_logprobs
            for j in range(row, row + count):
                position = first + 1 + (j - row)  # the prompt token this row predicts
                if position == len(request.prompt_logprobs):  # skip positions recomputed after preemption
                    request.prompt_logprobs.append(
                        self._logprob_dict(top_ids[j][:want], top_lps[j][:want], targets[j], lps[j], ranks[j])
                    )
            row += count

    # ------------------------------------------------------------------ samples
    def process_samples(self, so: SchedulerOutput, sampled: SamplerOutput, scheduler: Scheduler) -> list[Request]:
        """Append each row's token to its sequence, apply stop rules (finished sequences leave the
        scheduler at once) and return the requests touched, in order."""
        now = time.time()
        touched: dict[str, Request] = {}
        for row, (seq, _) in enumerate(so.sample_rows):
            self.append_token(seq, sampled.token_ids[row], sampled.logprobs[row], sampled.ranks[row],
                              sampled.top[row], now, scheduler)
            touched[seq.request_id] = seq.request
        return list(touched.values())

    def append_token(self, seq: Sequence, token: int, logprob: float, rank: int | None,
                     top: tuple[list[int], list[float]] | None, now: float, scheduler: Scheduler) -> bool:
        """Append one sampled token and apply the stop rules (a finished sequence leaves the
        scheduler at once); True when the sequence finished."""
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            top = top or ([], [])
            seq.logprobs.append(self._logprob_dict(top[0], top[1], token, logprob, rank))
        request = seq.request
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        request.metrics.last_token_time = now
        self._check_stop(seq, token)
        if seq.finish_reason is not None:
            scheduler.finish(seq)
            return True
        return False

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.request.params
        num_output = len(seq.token_ids) - seq.request.num_prompt_tokens  # (seq.num_output_tokens, once)
        stops_active = num_output >= params.min_tokens
        if stops_active:
            if not params.ignore_eos and token in seq.request.eos_token_ids:
                self._finish(seq, "stop", None)
                return
            if token in params.stop_ids:
                if params.include_stop_str_in_output:
                    detokenize_incrementally(self.tokenizer, seq, params.skip_special_tokens)
                self._finish(seq, "stop", token)
                return
        delta = detokenize_incrementally(self.tokenizer, seq, params.skip_special_tokens)
        if stops_active and delta and params.stop_strs:
            hit = find_stop_string(seq.text, len(delta), params.stop_strs, params.max_stop_len)
            if hit is not None:
                stop, index = hit
                seq.text = seq.text[: index + (len(stop) if params.include_stop_str_in_output else 0)]
                self._finish(seq, "stop", stop)
                return
        if num_output >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, "length", None)
            return
        seq.output_text_len = len(seq.text) - (
            held_back_chars(seq.text, params.stop_strs, params.max_stop_len) if params.stop_strs else 0)

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.output_text_len = len(seq.text)

    # ------------------------------------------------------------------ outputs
    def make_output(self, request: Request) -> RequestOutput:
        """The request's cumulative state; when ``best_of > n`` and it is done, the ``n`` samples
        with the highest cumulative logprob."""
        finished = request.is_finished
        params = request.params
        if params.prompt_logprobs is not None and request.prompt_logprobs is None:
            request.prompt_logprobs = [None]  # a one-token prompt has nothing to score
        seqs = request.seqs
        if finished and params.num_samples > params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        seqs = seqs[: params.n]
        outputs = [
            CompletionOutput(
                index=i,
                text=seq.text[: seq.output_text_len],
                token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for i, seq in enumerate(seqs)
        ]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
            outputs=outputs,
            finished=finished,
            metrics=RequestMetrics(**request.metrics.__dict__),  # a snapshot (cheaper than dataclasses.replace)
        )
