"""``generation`` on /v1/chat/completions: ``generate`` with the body's ``max_tokens``,
``temperature`` (0: greedy), ``top_p`` and ``stop``; the OpenAI chat completion response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from gpu_worker.backends.base import (
    CHAT,
    Backend,
    Batch,
    Job,
    Piece,
    Sampling,
    chat_completion,
    chat_messages,
    invalid,
    is_int,
)

MAX_STOP_STRINGS = 4


@dataclass(frozen=True, slots=True)
class Completion:
    """One generated answer, on the host."""

    text: str
    completion_tokens: int
    finish_reason: str


class _RowStop(StoppingCriteria):
    """Stops each row on its own: its ``max_tokens``, its stop strings, or an eos token.

    ``generate`` keeps one flag per row, so rows with different limits and stop strings share a
    batch; ``ended`` records how many tokens each row had made when it stopped, and why.
    """

    def __init__(
        self, tokenizer: Any, prompt_len: int, pieces: Sequence[Piece], eos: set[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.max_new = [p.max_new for p in pieces]
        self.stops = [p.sampling.stop if p.sampling else () for p in pieces]
        self.eos = eos
        self.ended: list[tuple[int, str] | None] = [None] * len(pieces)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        made = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        for i, token in enumerate(last):
            if self.ended[i] is not None:
                continue
            if token in self.eos:
                self.ended[i] = (made, "eos")
            elif self.stops[i] and any(
                s
                in self.tokenizer.decode(
                    input_ids[i, self.prompt_len :].tolist(), skip_special_tokens=True
                )
                for s in self.stops[i]
            ):
                self.ended[i] = (made, "stop")
            elif made >= self.max_new[i]:
                self.ended[i] = (made, "length")
        done = [e is not None for e in self.ended]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class GenerationBackend(Backend):
    """A causal LM through ``generate``; prompts are left-padded so every row ends together."""

    kind = "generation"
    endpoint = CHAT
    padding_side = "left"

    def load_model(self) -> PreTrainedModel:
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=self.dtype, local_files_only=True
        )
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        return model

    def special_tokens(self) -> tuple[list[int], list[int]]:
        """A chat template writes its own special tokens; a plain prompt gets the tokenizer's."""
        return ([], []) if self.has_template else super().special_tokens()

    def prompt(self, messages: list[dict[str, str]]) -> str:
        if self.has_template:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return str(text)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def parse(self, body: Mapping[str, Any]) -> Job:
        messages = chat_messages(body)
        if body.get("stream"):
            raise invalid("streaming is not served by the local route", "stream")
        n = body.get("n", 1)
        if n not in (1, None):
            raise invalid("only n = 1 is served by the local route", "n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
            raise invalid("must be a positive integer", "max_tokens")
        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 <= temperature <= 2
        ):
            raise invalid("must be a number from 0 to 2", "temperature")
        top_p = body.get("top_p", 1.0)
        if top_p is None:
            top_p = 1.0
        if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
            raise invalid("must be a number above 0, at most 1", "top_p")
        stop = body.get("stop")
        stops: tuple[str, ...]
        if stop is None:
            stops = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = tuple(stop)
        else:
            raise invalid("must be a string or a list of strings", "stop")
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise invalid(f"at most {MAX_STOP_STRINGS} non-empty strings", "stop")
        sampling = Sampling(max_tokens, float(temperature), float(top_p), stops)
        return Job(texts=(self.prompt(messages),), sampling=sampling)

    def pieces(self, job: Job, arrays: list[list[int]]) -> list[Piece]:
        (content,) = arrays
        wanted = job.sampling.max_tokens
        if wanted is not None and wanted >= self.context:
            raise invalid(
                f"{wanted} is more than the model's context of {self.context} tokens", "max_tokens"
            )
        default = max(1, self.context - len(content) - 1)
        max_new = wanted or min(self.spec.default_max_tokens, default)
        ids, truncated = self.fit(content, 0, room_after=max_new)
        return [Piece(ids, len(ids) + max_new, truncated, max_new, job.sampling)]

    @torch.inference_mode()
    def forward(self, batch: Batch) -> list[tuple[list[int], tuple[int, str]]]:
        """Each row's new tokens and how it ended; one ``generate`` per sampling setting."""
        groups: dict[tuple[float, float], list[int]] = {}
        for i, p in enumerate(batch.pieces):
            s = p.sampling or Sampling()
            key = (0.0, 1.0) if s.temperature == 0 else (s.temperature, s.top_p)
            groups.setdefault(key, []).append(i)
        out: list[tuple[list[int], tuple[int, str]]] = [([], (0, "length"))] * len(batch.pieces)
        for (temperature, top_p), rows in groups.items():
            index = torch.tensor(rows, device=self.device)
            input_ids = batch.inputs["input_ids"].index_select(0, index)  # (b, T)
            mask = batch.inputs["attention_mask"].index_select(0, index)  # (b, T)
            start = int(
                mask.any(dim=0).int().argmax()
            )  # drop columns that are padding in every row
            input_ids, mask = input_ids[:, start:], mask[:, start:]
            pieces = [batch.pieces[i] for i in rows]
            stop = _RowStop(self.tokenizer, input_ids.shape[1], pieces, self.eos)
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p}
                if temperature > 0
                else {"do_sample": False}
            )
            config = GenerationConfig(
                max_new_tokens=max(p.max_new for p in pieces),
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos) or None,
                **sampling,
            )
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([stop]),
            )  # (b, T + new)
            new = sequences[:, input_ids.shape[1] :].tolist()
            for j, row in enumerate(rows):
                ended = stop.ended[j] or (len(new[j]), "length")
                out[row] = (new[j][: ended[0]], ended)
        return out

    def postprocess(
        self, output: list[tuple[list[int], tuple[int, str]]], batch: Batch
    ) -> list[Any]:
        results = []
        for (ids, (made, why)), piece in zip(output, batch.pieces, strict=True):
            text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
            finish = "length" if why == "length" else "stop"
            stops = piece.sampling.stop if piece.sampling else ()
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            tokens = made - 1 if why == "eos" else made
            results.append(Completion(text, tokens, finish))
        return results

    def output_tokens(self, results: Sequence[Any]) -> int:
        return sum(r.completion_tokens for r in results)

    def answer(self, job: Job, pieces: Sequence[Piece], results: Sequence[Any]) -> dict[str, Any]:
        done: Completion = results[0]
        return chat_completion(
            self.spec.name,
            done.text,
            done.finish_reason,
            len(pieces[0].ids),
            done.completion_tokens,
        )

    def warmup_body(self) -> dict[str, Any]:
        return {
            "model": self.spec.name,
            "messages": [{"role": "user", "content": "warm up"}],
            "max_tokens": 2,
            "temperature": 0,
        }
