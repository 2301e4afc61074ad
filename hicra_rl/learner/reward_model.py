"""The reward-model learner: the policy learner's own gradient path on a sequence classifier with a scalar head.

``RewardLearner`` is a :class:`~hicra_rl.learner.engine.PolicyLearner` (same DeepSpeed engine, optimizer,
schedule, micro-batching, global normalisers, clipping and non-finite skip: ``gradient_step``) whose model is
an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (initialised from a causal LM, the head new, or
from a reward model to continue) and whose per-row output is the model's score.

Layout.  A pair is two consecutive rows, ``2k`` = chosen and ``2k + 1`` = rejected (:func:`pair_sequences`).
Each row is the pair's text with its last token as the one-token "response" span, so the learner's response
layout has width 1 and column 0 holds the row's score (HF pools the hidden state at the last non-padding
token, the padding being ``pad_token_id``, exactly as :class:`hicra_rl.rewards.model.RewardModelScorer` does
at scoring time).  Micro-batches keep the two rows of a pair together (they are planned as two-row groups),
so the Bradley–Terry loss of a pair is computed inside one forward/backward; its normaliser is the number of
pairs of the whole mini-batch over all ranks, so the accumulated gradient is that of the mean loss.
"""
from __future__ import annotations

import torch

from hicra_rl.algo.bradley_terry import bradley_terry_loss
from hicra_rl.learner.engine import MicroBatch, PolicyLearner
from hicra_rl.learner.sequences import build_sequences


def pair_sequences(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """(input_ids, attention_mask, response_mask) of encoded (chosen, rejected) pairs: rows 2k and 2k + 1, each
    with its last token as the scored one-token span.  Every text needs at least 2 tokens."""
    prompts, responses = [], []
    for k, pair in enumerate(pairs):
        for which, ids in zip(("chosen", "rejected"), pair):
            if len(ids) < 2:
                raise ValueError(f"pair {k}: the {which} text has {len(ids)} token(s); at least 2 are needed")
            prompts.append(list(ids[:-1]))
            responses.append(list(ids[-1:]))
    return build_sequences(prompts, responses, pad_id)


def bt_loss_fn(mb: MicroBatch):
    """Bradley–Terry loss of the pairs in one micro-batch (rows 2k, 2k + 1 of the mini-batch), normalised by
    the mini-batch's pairs over all ranks; stats summed over micro-batches are the mini-batch's means."""
    rows = mb.rows.tolist()
    at = {r: i for i, r in enumerate(rows)}
    if any((r ^ 1) not in at for r in rows):  # r ^ 1: the other row of r's pair
        raise RuntimeError(f"a micro-batch split a preference pair (rows {rows})")
    chosen_at = [at[r] for r in rows if r % 2 == 0]
    rejected_at = [at[r + 1] for r in rows if r % 2 == 0]
    scores = mb.log_probs[:, 0]
    chosen, rejected = scores[chosen_at], scores[rejected_at]
    n_pairs = mb.seq_normalizer / 2.0
    loss = bradley_terry_loss(chosen, rejected, normalizer=n_pairs)
    margin = (chosen - rejected).detach().float()
    right = (margin > 0).float() + 0.5 * (margin == 0).float()
    return loss, {"rm/loss": float(loss.detach()), "rm/accuracy": float(right.sum()) / n_pairs,
                  "rm/margin": float(margin.sum()) / n_pairs}, {}


class RewardLearner(PolicyLearner):
    """A scalar-head sequence classifier trained through ``PolicyLearner.gradient_step`` (see the module
    docstring).  ``pad_id`` is the padding id the model pools with (set in its config, saved with it).  With
    ``lora.rank`` > 0 the body gets adapters and the scalar head trains in full (``hicra_rl.learner.lora``)."""

    lora_task_type = "SEQ_CLS"

    def __init__(self, cfg, **kwargs):
        if cfg.micro_batch_tokens or cfg.shared_prefix:
            raise ValueError("the reward learner plans micro-batches by pairs: learner.micro_batch_tokens must be 0 "
                             "and learner.shared_prefix false")
        if kwargs.get("loss") is not None and kwargs["loss"].kl_coef != 0:
            raise ValueError("the reward learner has no reference model (kl_coef must be 0)")
        super().__init__(cfg, **kwargs)

    def _load_model(self, model_path: str, torch_dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from hicra_rl.rewards.model import pad_id_of

        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = pad_id_of(tokenizer, model.config)
        model.config.pad_token_id = self.pad_id   # batches > 1 need it; saved with the checkpoint
        return model

    def _response_log_probs(self, module, input_ids, attention_mask, starts, lengths, width):
        """The score of each row in column 0 of a [b, width] response layout (entropy: zeros)."""
        end = int((starts + lengths).max())
        ids = input_ids[:, :end].to(self.device)
        am = attention_mask[:, :end].to(self.device)
        scores = module(input_ids=ids, attention_mask=am, use_cache=False).logits[:, 0].float()
        out = torch.cat([scores[:, None], scores.new_zeros(scores.shape[0], width - 1)], dim=1)
        return out, torch.zeros_like(out.detach())

    def _plan_rows(self, ends, prompt_lengths=None, groups=None):
        """Micro-batches of whole pairs (rows 2k, 2k + 1), ``micro_batch_size`` rows each (at least one pair)."""
        n = len(ends)
        return super()._plan_rows(ends, [0] * n, [i // 2 for i in range(n)])

    def train_pairs(self, input_ids, attention_mask, response_mask) -> dict[str, float]:
        """One optimizer step of the Bradley–Terry loss over this rank's pairs (collective)."""
        if input_ids.shape[0] % 2:
            raise ValueError(f"{input_ids.shape[0]} rows are not whole pairs")
        out = self.gradient_step(input_ids, attention_mask, response_mask, bt_loss_fn, width=1)
        return {"rm/loss": out["rm/loss"], "rm/accuracy": out["rm/accuracy"], "rm/margin": out["rm/margin"],
                "rm/grad_norm": out["grad_norm"], "rm/nonfinite_skipped": out["nonfinite_skipped"],
                "rm/lr": float(self.lr_scheduler.get_last_lr()[0])}

    def scores(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """The score of every row, [B] (no gradient; CPU)."""
        return self.compute_log_probs(input_ids, attention_mask, response_mask, width=1)[0][:, 0]


__all__ = ["RewardLearner", "bt_loss_fn", "pair_sequences"]
