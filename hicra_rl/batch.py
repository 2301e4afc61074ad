"""The one batch object that carries a step's rollouts through the pipeline (data moves once).

rollout workers fill the sampled fields -> the driver attaches each response's problem (gold, task)
-> the verifier pool fills ``scores`` -> the tagger fills ``planning_masks`` / ``tagged_texts`` /
``sg_occurrences`` -> advantages and the learner read it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RolloutBatch:
    """B = n_prompts * G responses, grouped by prompt; every list is per response, in one order.

    Token-level fields are ragged lists until ``pad_ragged`` makes [B, W] tensors for the learner.
    """

    prompt_ids: list[list[int]]            # tokenised prompt (chat template applied)
    response_ids: list[list[int]]          # generated token ids (no prompt)
    sampling_logprobs: list[list[float]]   # log pi_sampler(token) as reported by vLLM
    finish_reasons: list[str]              # "stop" | "length" | ...
    group_ids: list[int]                   # index of the prompt each response answers
    response_texts: list[str]              # the sampler's text (what the verifier reads)
    prompt_texts: list[str] = field(default_factory=list)
    golds: list[Any] = field(default_factory=list)        # gold answer (or task entry) per response
    tasks: list[str] = field(default_factory=list)        # verifier name per response
    scores: list[Any] = field(default_factory=list)       # hicra_rl.rewards.pool.VerifyResult per response
    planning_masks: list[Any] = field(default_factory=list)   # bool per response token
    tagged_texts: list[str] = field(default_factory=list)     # text decoded from response_ids (tagger's)
    sg_occurrences: list[list[tuple[int, int, str]]] = field(default_factory=list)  # in tagged_texts
    # policy version (``LearnerGroup.version``) of the weights that sampled each response (``Fleet.generate``):
    # one value unless a rollout worker restarted mid-generation was given other weights than the others
    policy_versions: list[int] = field(default_factory=list)
    # the learned reward model's raw score per response (reward.model set; NaN where it was not finite)
    model_scores: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.response_ids]

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.scores]

    def validate(self) -> None:
        n = len(self.response_ids)
        for name in ("prompt_ids", "sampling_logprobs", "finish_reasons", "group_ids", "response_texts"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} rows, expected {n}")
        for name in ("prompt_texts", "golds", "tasks", "scores", "planning_masks", "tagged_texts", "sg_occurrences",
                     "policy_versions", "model_scores"):
            value = getattr(self, name)
            if value and len(value) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(value)} rows, expected {n}")
        for i, (ids, lps) in enumerate(zip(self.response_ids, self.sampling_logprobs)):
            if len(ids) != len(lps):
                raise ValueError(f"row {i}: {len(ids)} response tokens but {len(lps)} sampling log-probs")
        for i, (ids, pm) in enumerate(zip(self.response_ids, self.planning_masks)):
            if len(ids) != len(pm):
                raise ValueError(f"row {i}: {len(ids)} response tokens but planning mask of {len(pm)}")

    @classmethod
    def concat(cls, parts: Sequence[RolloutBatch], group_offsets: Sequence[int]) -> RolloutBatch:
        """Join the batches of several rollout workers; part i's group ids are shifted by ``group_offsets[i]``
        (the index of its first prompt in the step)."""
        if len(parts) != len(group_offsets):
            raise ValueError(f"{len(parts)} parts but {len(group_offsets)} group offsets")
        out = cls([], [], [], [], [], [])
        for part, offset in zip(parts, group_offsets):
            for name in ("prompt_ids", "response_ids", "sampling_logprobs", "finish_reasons", "response_texts",
                         "prompt_texts"):
                getattr(out, name).extend(getattr(part, name))
            out.group_ids.extend(g + offset for g in part.group_ids)
        out.validate()
        return out

    _PER_RESPONSE = ("prompt_ids", "response_ids", "sampling_logprobs", "finish_reasons", "response_texts",
                     "prompt_texts", "golds", "tasks", "scores", "planning_masks", "tagged_texts", "sg_occurrences",
                     "policy_versions", "model_scores")

    def take_groups(self, groups: Sequence[int]) -> RolloutBatch:
        """The responses of prompt groups ``groups`` (in that order), renumbered 0..len(groups)-1; every
        per-response field that is filled comes along (golds, scores, ...)."""
        rows = [[i for i, g in enumerate(self.group_ids) if g == group] for group in groups]
        out = RolloutBatch([], [], [], [], [], [])
        for name in self._PER_RESPONSE:
            values = getattr(self, name)
            if values:
                setattr(out, name, [values[i] for group_rows in rows for i in group_rows])
        out.group_ids = [k for k, group_rows in enumerate(rows) for _ in group_rows]
        return out

    @classmethod
    def join(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Scored batches one after the other; batch i's group ids follow those of batches < i."""
        out, offset = cls([], [], [], [], [], []), 0
        for b in batches:
            for name in cls._PER_RESPONSE:
                getattr(out, name).extend(getattr(b, name))
            out.group_ids.extend(g + offset for g in b.group_ids)
            offset += max(b.group_ids, default=-1) + 1
        out.validate()
        return out

    def attach_problems(self, golds: Sequence[Any], tasks: Sequence[str]) -> None:
        """Give each response its prompt's gold answer and verifier (``golds``/``tasks`` are per prompt)."""
        self.golds = [golds[g] for g in self.group_ids]
        self.tasks = [tasks[g] for g in self.group_ids]


def pad_ragged(rows: list[list], pad_value, dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
    """Right-pad ragged rows into a [len(rows), width] tensor."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), pad_value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r[:width], dtype=dtype)
    return out


def response_layout_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] 0/1 float mask of the valid columns of the response layout (column j < length)."""
    cols = torch.arange(width, device=lengths.device)[None, :]
    return (cols < lengths[:, None]).float()
