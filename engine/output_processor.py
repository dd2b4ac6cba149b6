"""Turns sampled tokens into request state: stop checks, detokenized text, logprobs, outputs."""

from __future__ import annotations

import time

import torch

from pageant.engine.detokenizer import detokenize_batch, detokenize_incrementally, find_stop_string, held_back_chars
from pageant.engine.model_runner import ModelInput
from pageant.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pageant.engine.sampler import SamplerOutput, prompt_logprobs
from pageant.engine.sampling_params import RequestOutputKind
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
        ids, lps, ranks, tops = sampled.token_ids, sampled.logprobs, sampled.ranks, sampled.top
        rows = so.sample_rows
        self.append_tokens([(seq, ids[r], lps[r], ranks[r], tops[r]) for r, (seq, _) in enumerate(rows)],
                           time.time(), scheduler)
        return list(dict.fromkeys(seq.request for seq, _ in rows))

    def append_token(self, seq: Sequence, token: int, logprob: float, rank: int | None,
                     top: tuple[list[int], list[float]] | None, now: float, scheduler: Scheduler) -> bool:
        """Append one sampled token and apply the stop rules (a finished sequence leaves the
        scheduler at once); True when the sequence finished."""
        self.append_tokens([(seq, token, logprob, rank, top)], now, scheduler)
        return seq.finish_reason is not None

    def append_tokens(self, rows: list[tuple[Sequence, int, float, int | None, tuple | None]], now: float,
                      scheduler: Scheduler) -> None:
        """``append_token`` for many sequences (each at most once): the token checks per row, then
        the detokenization of every row that needs text in one batched decoder call
        (``detokenize_batch``), then the text checks."""
        pending: list[tuple[Sequence, int, int, bool]] = []  # (seq, token, num_output, ends at a stop token)
        for seq, token, logprob, rank, top in rows:
            seq.token_ids.append(token)
            seq.cumulative_logprob += logprob
            if seq.logprobs is not None:
                top = top or ([], [])
                seq.logprobs.append(self._logprob_dict(top[0], top[1], token, logprob, rank))
            request = seq.request
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            params = request.params
            num_output = len(seq.token_ids) - len(request.prompt_token_ids)
            if num_output >= params.min_tokens:
                if not params.ignore_eos and token in request.eos_token_ids:
                    self._finish(seq, "stop", None)
                    scheduler.finish(seq)
                    continue
                if token in params.stop_ids:
                    if params.include_stop_str_in_output:
                        pending.append((seq, token, num_output, True))  # its text is shown: decode it first
                        continue
                    self._finish(seq, "stop", token)
                    scheduler.finish(seq)
                    continue
            pending.append((seq, token, num_output, False))
        if not pending:
            return
        if len(pending) == 1:
            seq = pending[0][0]
            deltas = [detokenize_incrementally(self.tokenizer, seq, seq.request.params.skip_special_tokens)]
        else:
            deltas = detokenize_batch(self.tokenizer, [p[0] for p in pending])
        for (seq, token, num_output, stop_token), delta in zip(pending, deltas):
            if stop_token:
                self._finish(seq, "stop", token)
            elif not self._check_text(seq, delta, num_output):
                continue
            scheduler.finish(seq)

    def _check_text(self, seq: Sequence, delta: str, num_output: int) -> bool:
        """Stop strings in the new text, then the length limits; True when ``seq`` finished. Else
        sets how much of the text may be shown (not a possible start of a stop string)."""
        params = seq.request.params
        if delta and params.stop_strs and num_output >= params.min_tokens:
            hit = find_stop_string(seq.text, len(delta), params.stop_strs, params.max_stop_len)
            if hit is not None:
                stop, index = hit
                seq.text = seq.text[: index + (len(stop) if params.include_stop_str_in_output else 0)]
                self._finish(seq, "stop", stop)
                return True
        if num_output >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, "length", None)
            return True
        seq.output_text_len = len(seq.text) - (
            held_back_chars(seq.text, params.stop_strs, params.max_stop_len) if params.stop_strs else 0)
        return False

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.output_text_len = len(seq.text)

    # ------------------------------------------------------------------ outputs
    def make_output(self, request: Request) -> RequestOutput | None:
        """The request's output after a step, by its ``output_kind``: its state so far
        (CUMULATIVE), what is new since its previous output (DELTA: the samples with new tokens, text
        or a finish reason; prompt logprobs in the first), or None until it finishes (FINAL_ONLY).
        When ``best_of > n`` and it is done, the ``n`` samples with the highest cumulative logprob."""
        finished = request.is_finished
        params = request.params
        kind = params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if params.prompt_logprobs is not None and request.prompt_logprobs is None:
            request.prompt_logprobs = [None]  # a one-token prompt has nothing to score
        seqs = request.seqs
        if finished and params.num_samples > params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        seqs = seqs[: params.n]
        prompt_logprobs = request.prompt_logprobs
        if kind is RequestOutputKind.DELTA:
            outputs = [out for i, seq in enumerate(seqs) if (out := self._delta(i, seq)) is not None]
            if request.num_outputs:
                prompt_logprobs = None  # (sent with the first output)
        else:
            num_prompt = len(request.prompt_token_ids)
            outputs = [
                CompletionOutput(i, seq.text[: seq.output_text_len], seq.token_ids[num_prompt:],
                                 seq.cumulative_logprob, list(seq.logprobs) if seq.logprobs is not None else None,
                                 seq.finish_reason, seq.stop_reason)
                for i, seq in enumerate(seqs)
            ]
        request.num_outputs += 1
        m = request.metrics  # a snapshot: the engine keeps updating its own
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,  # (never changed by the engine: shared, not copied)
            prompt_logprobs=list(prompt_logprobs) if prompt_logprobs is not None else None,
            outputs=outputs,
            finished=finished,
            metrics=RequestMetrics(m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
                                   m.finished_time),
        )

    @staticmethod
    def _delta(index: int, seq: Sequence) -> CompletionOutput | None:
        """What ``seq`` gained since its previous output (None: nothing, and no new finish reason)."""
        num_prompt = seq.request.num_prompt_tokens
        first_token, first_char = seq.num_emitted_tokens, seq.num_emitted_chars
        num_tokens, num_chars = len(seq.token_ids) - num_prompt, seq.output_text_len
        newly_finished = seq.finish_reason is not None and not seq.finish_emitted
        if num_tokens == first_token and num_chars == first_char and not newly_finished:
            return None
        seq.num_emitted_tokens, seq.num_emitted_chars = num_tokens, num_chars
        seq.finish_emitted = seq.finish_reason is not None
        return CompletionOutput(index, seq.text[first_char:num_chars], seq.token_ids[num_prompt + first_token:],
                                seq.cumulative_logprob,
                                seq.logprobs[first_token:] if seq.logprobs is not None else None,
                                seq.finish_reason, seq.stop_reason)
