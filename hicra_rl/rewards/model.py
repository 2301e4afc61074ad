"""Learned reward models: checking a checkpoint, and scoring (prompt, response) pairs with it (no Ray).

A reward model here is a Hugging Face ``<Arch>ForSequenceClassification`` checkpoint with a scalar head
(``num_labels=1``): a decoder (Llama, Qwen2, ...) whose ``score`` linear layer maps the hidden state of the
last non-padding token to one number.  That is what ``hicra-rm train`` writes and what OpenRLHF's and TRL's
reward trainers write for causal LMs ("a causal LM with a scalar head").  A plain causal LM checkpoint has no
trained head: loading it as a classifier would give a randomly initialised one, so it is refused.

The model reads ``prompt + response`` as one text (no separator, no special tokens added: the prompt is the
chat-templated text the policy saw, which carries its own), tokenised by the reward model's own tokenizer;
a text longer than ``max_tokens`` keeps its last ``max_tokens`` tokens (the response's end, where the answer
is) and is counted.  Training (``hicra_rl.learner.reward_model``) and scoring build their inputs with the same
:func:`encode_pair`, so a checkpoint scores exactly as it was trained.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

from hicra_rl.errors import BadInputError, InputNotFoundError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_HEAD_PREFIXES = ("score.", "classifier.")   # HF's scalar heads: decoders' ``score``, encoders' ``classifier``


def _num_labels(config: dict) -> int:
    if isinstance(config.get("num_labels"), int):
        return config["num_labels"]
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return 2  # transformers' default when config.json does not say


def _weight_names(folder: Path) -> set[str] | None:
    """Parameter names of the safetensors weights (headers only), or None when there are none to read."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    return names


def check_reward_model_dir(path: str | os.PathLike, key: str = "reward.model") -> str:
    """The absolute path of a usable reward-model folder, or a one-line :class:`~hicra_rl.errors.UserInputError`
    naming ``key``, the folder and what is wrong: not a directory, no ``config.json``, not a sequence
    classifier, a head of more than one output, no weights for the head, no tokenizer.  Reads JSON and
    safetensors headers only (milliseconds; no transformers import)."""
    folder = Path(os.path.abspath(os.path.expanduser(str(path))))
    if not folder.is_dir():
        raise InputNotFoundError(f"{key}: {str(path)!r} is not an existing directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputNotFoundError(f"{key}: {folder} has no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"{key}: {config_file} is not valid JSON: {err}") from None
    arch = list(config.get("architectures") or [])
    if not any(a.endswith("ForSequenceClassification") for a in arch):
        raise BadInputError(
            f"{key}: {folder} is a {', '.join(arch) or 'model without architectures in config.json'}, not a "
            "sequence classifier with a scalar head (<Arch>ForSequenceClassification, num_labels=1): a causal LM "
            "has no trained reward head (train one from it with `hicra-rm train`)")
    n = _num_labels(config)
    if n != 1:
        raise BadInputError(f"{key}: {folder} has a head of {n} outputs ({arch[0]}, num_labels={n}); a reward "
                            "model has one (num_labels=1)")
    names = _weight_names(folder)
    if names is None and not any(folder.glob("*.bin")) and not any(folder.glob("*.bin.index.json")):
        raise InputNotFoundError(f"{key}: {folder} has no weights (*.safetensors / *.bin)")
    if names is not None and not any(name.startswith(p) or f".{p}" in name for name in names for p in _HEAD_PREFIXES):
        raise BadInputError(f"{key}: {folder} has no weights for its scalar head (score.weight): its head would be "
                            "randomly initialised")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise InputNotFoundError(f"{key}: {folder} has no tokenizer files (one of {', '.join(_TOKENIZER_FILES)})")
    return str(folder)


def pad_id_of(tokenizer, config=None) -> int:
    """The padding id a reward model pools with: the config's, else the tokenizer's pad, else its EOS."""
    for value in (getattr(config, "pad_token_id", None), tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    raise BadInputError(f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has neither a pad nor an EOS "
                        "token: a reward model cannot find the last token of a padded batch")


def encode_pair(tokenizer, prompt: str, response: str, max_tokens: int) -> tuple[list[int], bool]:
    """(token ids of ``prompt + response``, whether they were cut to their last ``max_tokens``)."""
    ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    if len(ids) > max_tokens:
        return list(ids[-max_tokens:]), True
    return list(ids), False


class RewardModelScorer:
    """A reward model loaded for scoring: ``score([(prompt, response), ...]) -> [float]`` (raw scores, in
    order; a NaN or infinite score is returned as such and counted in ``nonfinite``, never replaced by 0).

    Loading checks the folder (:func:`check_reward_model_dir`) and then that every weight of the
    classifier, its head included, came from the checkpoint (transformers' ``missing_keys``)."""

    def __init__(self, path: str, *, dtype: str = "float32", batch_size: int = 16, max_tokens: int = 1024,
                 device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1 or max_tokens < 2:
            raise ValueError(f"batch_size must be >= 1 and max_tokens >= 2, got {batch_size} and {max_tokens}")
        t0 = time.perf_counter()
        self.path = check_reward_model_dir(path)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if dtype not in dtypes:
            raise ValueError(f"reward model dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        model, info = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=dtypes[dtype],
                                                                         output_loading_info=True)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise BadInputError(f"reward model {self.path}: weights missing from the checkpoint, so they would be "
                                f"random: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if model.config.num_labels != 1:
            raise BadInputError(f"reward model {self.path}: a head of {model.config.num_labels} outputs; a reward "
                                "model has one (num_labels=1)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.pad_id = pad_id_of(self.tokenizer, model.config)
        model.config.pad_token_id = self.pad_id  # HF pools at the last token that is not padding
        self.model = model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - t0
        self.items = self.truncated = self.nonfinite = 0
        self.busy_seconds = 0.0

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        import torch

        t0 = time.perf_counter()
        encoded = []
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise TypeError(f"item {i} must be (prompt, response) strings, got {pair!r:.200}")
            ids, cut = encode_pair(self.tokenizer, pair[0], pair[1], self.max_tokens)
            if not ids:
                raise ValueError(f"item {i}: prompt + response is empty")
            self.truncated += int(cut)
            encoded.append(ids)
        scores = [float("nan")] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
        with torch.no_grad():
            for s in range(0, len(order), self.batch_size):
                rows = order[s:s + self.batch_size]
                width = max(len(encoded[i]) for i in rows)
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for k, i in enumerate(rows):
                    ids[k, :len(encoded[i])] = torch.as_tensor(encoded[i])
                    mask[k, :len(encoded[i])] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for k, i in enumerate(rows):
                    scores[i] = float(logits[k, 0].float())
        self.items += len(scores)
        self.nonfinite += sum(not math.isfinite(x) for x in scores)
        self.busy_seconds += time.perf_counter() - t0
        return scores

    def stats(self) -> dict[str, float]:
        return {"reward_model/items": float(self.items), "reward_model/truncated": float(self.truncated),
                "reward_model/nonfinite": float(self.nonfinite), "reward_model/busy_seconds": self.busy_seconds}


__all__ = ["RewardModelScorer", "check_reward_model_dir", "encode_pair", "pad_id_of"]
