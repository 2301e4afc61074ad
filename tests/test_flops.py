"""The learner's FLOP accounting (``hicra_rl.learner.flops``) by hand, and its GFLOP/s stats on a tiny model."""
from __future__ import annotations

import types

import pytest
import torch
from learner_fixtures import VOCAB, random_rows

from hicra_rl.config import ConfigError, LearnerConfig, check_learner_config
from hicra_rl.learner import flops
from hicra_rl.learner.sequences import build_sequences

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# hidden 4, 2 query heads of 2, 1 key/value head, MLP 6, 2 layers, vocabulary 10
SMALL = types.SimpleNamespace(hidden_size=4, intermediate_size=6, num_attention_heads=2, num_key_value_heads=1,
                              num_hidden_layers=2, vocab_size=10)


def test_gemm_shapes_of_one_micro_batch_by_hand():
    shapes = flops.linear_gemm_shapes(SMALL, positions=5, head_tokens=3)
    # q: [5 x 4] @ [4 x 4]; its input gradient [5 x 4] @ [4 x 4]; its weight gradient [4 x 5] @ [5 x 4]
    assert shapes[:3] == [(5, 4, 4), (5, 4, 4), (4, 5, 4)]
    # k (and v): 1 head of 2 -> [5 x 4] @ [4 x 2], dX [5 x 2] @ [2 x 4], dW [2 x 5] @ [5 x 4]
    assert shapes[3:6] == [(5, 4, 2), (5, 2, 4), (2, 5, 4)]
    # down: [5 x 6] @ [6 x 4], dX [5 x 4] @ [4 x 6], dW [4 x 5] @ [5 x 6]; the layer's last three
    assert shapes[18:21] == [(5, 6, 4), (5, 4, 6), (4, 5, 6)]
    assert shapes[21:42] == shapes[:21]                         # the second layer
    assert shapes[42:] == [(3, 4, 10), (3, 10, 4), (10, 3, 4)]  # the vocabulary projection at 3 tokens
    # an update's micro-batches one after another
    assert flops.update_gemm_shapes(SMALL, [(5, 3), (2, 1)]) == shapes + flops.linear_gemm_shapes(SMALL, 2, 1)
    # per layer the weights are 16 + 8 + 8 + 16 + 24 + 24 + 24 = 120: 3 products x 2 x 5 x 120 = 3600 a layer,
    # and 3 x 2 x 3 x 40 = 720 for the head
    assert flops.gemm_flops(shapes) == 2 * 3600 + 720
    # without padding the GEMMs are exactly the useful FLOPs: 6 x (240 weights x 5 tokens + 40 x 3)
    assert flops.useful_flops(240, 40, 5, 3) == 7920


def test_matrix_weights_of_a_tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    # per layer: q 64x64, k and v 64x32 (2 heads of 16), o 64x64, gate/up/down 64x128
    assert flops.matrix_weights(LlamaForCausalLM(cfg), cfg) == (2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192),
                                                               VOCAB * 64)


def test_time_gemms_times_each_product_once(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr(flops, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    # three products (one shape twice): one clock tick each, the untimed warm-ups take none
    assert flops.time_gemms([(2, 3, 4), (5, 5, 5), (2, 3, 4)]) == 3.0
    assert 0.0 < flops.time_gemms([(64, 64, 64)]) < 10.0   # the real clock


def test_gemm_reference_every_must_not_be_negative():
    check_learner_config(LearnerConfig(gemm_reference_every=0))
    with pytest.raises(ConfigError, match=r"learner.gemm_reference_every.*must be >= 0.*got -1"):
        check_learner_config(LearnerConfig(gemm_reference_every=-1))


@pytest.fixture(scope="module")
def port():
    from learner_fixtures import free_port

    return free_port()


def _batch(prompts, responses):
    ids, am, rm = build_sequences(prompts, responses, pad_id=0)
    return {"input_ids": ids, "attention_mask": am, "response_mask": rm, "old_log_probs": None,
            "advantages": torch.ones(len(responses), max(map(len, responses)))}


def test_update_reports_its_useful_gflops_and_the_gemm_reference(tiny_llama, port, monkeypatch):
    """Rows of 2 + 5 and 4 + 2 tokens in one micro-batch: 13 real tokens, forwarded as 2 x 7 = 14 positions,
    7 response tokens. With an update of 4 s on the clock, perf/update_gflops = 6 x (73,728 x 13 + 49,152 x
    64 x 7) / 4 / 1e9; the GEMM reference runs on every second update only."""
    from hicra_rl.learner import engine
    from hicra_rl.learner.engine import PolicyLearner

    learner = PolicyLearner(LearnerConfig(zero_stage=0, lr=1e-2, micro_batch_size=2, gemm_reference_every=2),
                            model_path=tiny_llama, master_port=port)
    batch = _batch(*random_rows(3, [2, 4], [5, 2]))
    clocks = types.SimpleNamespace(perf_counter=iter([10.0, 14.0, 20.0, 22.0, 30.0, 35.0]).__next__,
                                   process_time=iter([1.0, 2.0, 3.0, 4.0]).__next__)
    monkeypatch.setattr(engine, "time", clocks)
    first = learner.update(batch)
    assert learner.last_gemm_work == [(14, 7)]
    assert first["perf/update_gflops"] == pytest.approx(6 * (73728 * 13 + VOCAB * 64 * 7) / 4 / 1e9)
    assert "perf/gemm_reference_gflops" not in first and "perf/update_vs_gemm" not in first
    second = learner.update(batch)   # 2 s this time, then 5 s of reference GEMMs
    assert second["perf/update_gflops"] == pytest.approx(2 * first["perf/update_gflops"])
    assert second["perf/gemm_reference_gflops"] > 0
    assert second["perf/update_vs_gemm"] == pytest.approx(second["perf/update_gflops"]
                                                          / second["perf/gemm_reference_gflops"])
    assert second["perf/update_s"] == 2.0 and second["perf/gemm_reference_s"] == 5.0


def test_packed_prompt_groups_count_their_packed_positions(tiny_llama, port):
    """shared_prefix: the two responses (5 and 3 tokens) of one 2-token prompt are one packed row of
    2 + 5 + 3 = 10 positions, 8 of them response tokens."""
    from hicra_rl.learner.engine import PolicyLearner

    learner = PolicyLearner(LearnerConfig(zero_stage=0, lr=1e-2, micro_batch_size=2, shared_prefix=True),
                            model_path=tiny_llama, master_port=port + 1)
    prompts, responses = random_rows(4, [2, 2], [5, 3])
    stats = learner.update(_batch([prompts[0], prompts[0]], responses))
    assert learner.last_gemm_work == [(10, 8)]
    assert stats["perf/forward_tokens_per_s"] * stats["perf/update_s"] == pytest.approx(10)


def test_update_counts_its_page_faults(tiny_llama, port, monkeypatch):
    """perf/update_page_faults: the process's minor page faults during the update (getrusage before and
    after: 100 then 350 -> 250); perf/update_sys_frac: the kernel's share of its CPU seconds (user 2.0 -> 5.0 s,
    system 1.0 -> 2.0 s: 1 / (3 + 1) = 0.25); perf/learner_max_rss_gib: the peak resident memory, 3 x 2**20 KiB
    -> 3.0 GiB."""
    from hicra_rl.learner import engine
    from hicra_rl.learner.engine import PolicyLearner

    learner = PolicyLearner(LearnerConfig(zero_stage=0, lr=1e-2, micro_batch_size=2), model_path=tiny_llama,
                            master_port=port + 2)
    batch = _batch(*random_rows(5, [2, 3], [4, 2]))
    real = learner.update(batch)
    assert real["perf/update_page_faults"] >= 0 and 0 <= real["perf/update_sys_frac"] <= 1   # the real counters
    readings = iter([(100, 2.0, 1.0, 1 * 2**20), (350, 5.0, 2.0, 3 * 2**20)])
    monkeypatch.setattr(engine, "resource", types.SimpleNamespace(
        RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(
            **dict(zip(("ru_minflt", "ru_utime", "ru_stime", "ru_maxrss"), next(readings))))))
    stats = learner.update(batch)
    assert stats["perf/update_page_faults"] == 250.0
    assert stats["perf/update_sys_frac"] == pytest.approx(0.25)
    assert stats["perf/learner_max_rss_gib"] == 3.0
