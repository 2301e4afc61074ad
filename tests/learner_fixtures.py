"""Shared helpers for the learner / checkpoint tests: a tiny tied-embedding Llama, a free port,
random prompt+response batches and an independent (plain HF + torch) log-prob computation."""
from __future__ import annotations

import glob
import os
import socket

import torch

VOCAB = 49152


def build_tiny_llama(out_dir: str, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


def float32_model(path):
    """The Hugging Face causal LM at ``path`` in float32: the reference the learner's results are checked against."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_rows(seed: int, prompt_lens, response_lens):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in response_lens]
    return prompts, responses


def direct_log_probs(model, prompts, responses, temperature: float = 1.0):
    """log pi and entropy of each response token, one unpadded sequence at a time, via log_softmax."""
    lps, ents = [], []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float() / temperature
        logsm = torch.log_softmax(logits, -1)
        lps.append(logsm.gather(-1, torch.tensor(r)[:, None])[:, 0])
        ents.append(-(logsm.exp() * logsm).sum(-1))
    return lps, ents


def to_layout(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def remove_shm_buffers() -> None:
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            os.remove(path)
        except OSError:
            pass


def ws2_batch():
    """The global batch of the two-rank test: rank 0's rows are short, rank 1's long, so a rank-local
    token normaliser would give a different loss than the global one."""
    from hicra_rl.learner.sequences import build_sequences

    prompts, responses = random_rows(7, [3, 6, 2, 5], [2, 3, 9, 8])
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    g = torch.Generator().manual_seed(8)
    advantages = torch.randn(4, 9, generator=g)
    old_shift = 0.3 * torch.randn(4, 9, generator=g)
    return ids, am, rm, advantages, old_shift


def ws2_learner_config():
    from hicra_rl.config import LearnerConfig

    # eps = 1: Adam's step ~ lr * gradient, so the weights compare the gradients (see test_learner)
    return LearnerConfig(zero_stage=2, lr=0.1, eps=1.0, micro_batch_size=1, max_grad_norm=1.0)


def ws2_rank_main(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    """One rank of the world-size-2 test: update on its half of ``ws2_batch`` and save the result."""
    torch.set_num_threads(1)
    from hicra_rl.learner.engine import PolicyBatch, PolicyLearner

    learner = PolicyLearner(ws2_learner_config(), model_path=model_dir, rank=rank, world_size=world_size,
                            master_port=port, timeout_s=120)
    ids, am, rm, advantages, old_shift = ws2_batch()
    rows = slice(2 * rank, 2 * rank + 2)
    lp, _ = learner.compute_log_probs(ids[rows], am[rows], rm[rows], width=advantages.shape[1])
    stats = learner.update(PolicyBatch(ids[rows], am[rows], rm[rows], lp + old_shift[rows], advantages[rows]))
    weights = {k: v.detach().clone() for k, v in learner.engine.module.state_dict().items()}
    torch.save({"stats": stats, "weights": weights}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
