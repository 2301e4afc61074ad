"""The one batch object that carries a step's rollouts through the pipeline (data moves once)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RolloutBatch:
    """B = n_prompts * G responses, grouped by prompt.

    Lists are per response, in the same order everywhere.  Token-level fields are lists of
    1-D int / float lists (ragged) until ``to_padded`` makes [B, T] tensors for the learner.
    """

    prompt_ids: list[list[int]]            # tokenised prompt (chat template applied)
    response_ids: list[list[int]]          # generated token ids (no prompt)
    sampling_logprobs: list[list[float]]   # log pi_sampler(token) as reported by vLLM
    finish_reasons: list[str]              # "stop" | "length" | ...
    group_ids: list[int]                   # index of the prompt each response answers
    response_texts: list[str]
    prompt_texts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)          # gold answer per response
    rewards: list[float] = field(default_factory=list)
    planning_masks: list[list[bool]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.response_ids)

    def validate(self) -> None:
        n = len(self.response_ids)
        for name in ("prompt_ids", "sampling_logprobs", "finish_reasons", "group_ids", "response_texts"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} rows, expected {n}")
        for name in ("answers", "rewards", "planning_masks"):
            value = getattr(self, name)
            if value and len(value) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(value)} rows, expected {n}")
        for i, (ids, lps) in enumerate(zip(self.response_ids, self.sampling_logprobs)):
            if len(ids) != len(lps):
                raise ValueError(f"row {i}: {len(ids)} response tokens but {len(lps)} sampling log-probs")
        for i, (ids, pm) in enumerate(zip(self.response_ids, self.planning_masks)):
            if len(ids) != len(pm):
                raise ValueError(f"row {i}: {len(ids)} response tokens but planning mask of {len(pm)}")


def pad_ragged(rows: list[list], pad_value, dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
    """Right-pad ragged rows into a [len(rows), width] tensor."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), pad_value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r[:width], dtype=dtype)
    return out
