"""Prompts through the tokenizer's chat template, asking for the final answer in ``\\boxed{}``.

A prompt longer than ``max_prompt_tokens`` is never cut: it raises :class:`PromptTooLongError` (listing
the row ids), or with ``on_too_long="skip"`` it is left out and its id reported in ``PromptSet.skipped_ids``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hicra_rl.errors import BadInputError

__all__ = [
    "DEFAULT_INSTRUCTION",
    "Prompt",
    "PromptConfig",
    "PromptSet",
    "PromptTooLongError",
    "build_prompts",
    "prompt_text",
]

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptConfig:
    """How a problem becomes a chat prompt.

    ``system``: the system message; None keeps the chat template's own default (if it has one).
    ``user_template``: the user message, with ``{problem}`` and ``{instruction}`` fields.
    ``chat_template``: a Jinja template to use when the tokenizer has none (or to override it).
    """

    system: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    user_template: str = "{problem}\n\n{instruction}"
    chat_template: str | None = None
    max_prompt_tokens: int = 1024
    on_too_long: str = "error"

    def __post_init__(self) -> None:
        if self.on_too_long not in ("error", "skip"):
            raise ValueError(f"on_too_long must be 'error' or 'skip', got {self.on_too_long!r}")
        if self.max_prompt_tokens <= 0:
            raise ValueError(f"max_prompt_tokens must be > 0, got {self.max_prompt_tokens}")
        if "{problem}" not in self.user_template:
            raise ValueError(f"user_template must contain '{{problem}}', got {self.user_template!r}")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str              # the chat-templated prompt, ending with the assistant turn's opening
    token_ids: list[int]   # its tokens (special tokens included by the template, none added)
    answer: str
    task: str
    gold_entry: str = ""


@dataclass
class PromptSet:
    prompts: list[Prompt]
    skipped_ids: list[str] = field(default_factory=list)   # over max_prompt_tokens (with on_too_long="skip")


class PromptTooLongError(BadInputError):
    def __init__(self, ids_and_lengths: list[tuple[str, int]], limit: int):
        self.ids_and_lengths = ids_and_lengths
        shown = ", ".join(f"{i} ({n} tokens)" for i, n in ids_and_lengths[:10])
        more = f" and {len(ids_and_lengths) - 10} more" if len(ids_and_lengths) > 10 else ""
        super().__init__(
            f"{len(ids_and_lengths)} prompt(s) longer than max_prompt_tokens={limit}: {shown}{more} "
            "(raise the limit, or set on_too_long='skip' to leave them out)"
        )


def _messages(problem: str, cfg: PromptConfig) -> list[dict[str, str]]:
    user = cfg.user_template.format(problem=problem, instruction=cfg.instruction)
    messages = [{"role": "system", "content": cfg.system}] if cfg.system is not None else []
    return messages + [{"role": "user", "content": user}]


def prompt_text(tokenizer, problem: str, cfg: PromptConfig = PromptConfig()) -> str:
    """The chat-templated prompt of one problem, ready for generation (assistant turn opened)."""
    template = cfg.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise BadInputError(
            f"tokenizer {type(tokenizer).__name__} of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat "
            "template (its tokenizer_config.json has no 'chat_template' and there is no chat_template.jinja; "
            "base models often have none): use an instruct model's tokenizer, add a template to that folder, "
            "or set PromptConfig.chat_template"
        )
    return tokenizer.apply_chat_template(
        _messages(problem, cfg), chat_template=template, tokenize=False, add_generation_prompt=True
    )


def build_prompts(tokenizer, rows: Iterable[Mapping[str, Any]], cfg: PromptConfig = PromptConfig()) -> PromptSet:
    """Prompts (text + token ids) for problem rows with ``id, problem, answer, task`` (a ProblemSet's rows)."""
    rows = list(rows)
    texts = [prompt_text(tokenizer, row["problem"], cfg) for row in rows]
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    prompts: list[Prompt] = []
    too_long: list[tuple[str, int]] = []
    for row, text, ids in zip(rows, texts, token_ids):
        if len(ids) > cfg.max_prompt_tokens:
            too_long.append((str(row["id"]), len(ids)))
            continue
        prompts.append(Prompt(str(row["id"]), text, list(ids), row["answer"], row.get("task", "math"),
                              row.get("gold_entry") or ""))
    if too_long:
        if cfg.on_too_long == "error":
            raise PromptTooLongError(too_long, cfg.max_prompt_tokens)
        log.warning("skipped %d of %d prompts longer than %d tokens: %s", len(too_long), len(rows),
                    cfg.max_prompt_tokens, ", ".join(i for i, _ in too_long[:10]))
    return PromptSet(prompts, [i for i, _ in too_long])
