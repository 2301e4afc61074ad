"""Learned reward models end to end on CPU, without Ray: the config keys and their errors, the checks of a
reward-model folder (missing, a causal LM, a head of 2 outputs, no head weights), preference-pair files and
their one-line row errors, ``hicra-rm train`` on a tiny random sequence classifier (Bradley–Terry through the
learner's ``gradient_step``: its loss and gradient equal a direct computation; separable pairs reach held-out
pair accuracy 1.0; the checkpoint loads in the scorer and scores as the learner did), the scorer's non-finite
path, the reward-model actor's time bound, and a trainer step with ``reward.source=gated`` / ``model`` on the
in-process fakes of tests/test_trainer_step.py."""
import json
import math
import os

import pytest
import torch

from hicra_rl.config import ConfigError, TrainConfig, validate
from hicra_rl.errors import BadInputError, InputNotFoundError, one_line

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


def _tiny_config(tokenizer, num_labels=1):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, smollm2_tokenizer, offline):
    """A tiny random LlamaForSequenceClassification (num_labels=1) with SmolLM2's tokenizer."""
    from transformers import LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(0)
    LlamaForSequenceClassification(_tiny_config(smollm2_tokenizer)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return str(folder)


def pairs_file(path, pairs):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return str(path)


def separable_pairs(start: int, n: int) -> list[dict]:
    """Chosen answers end in " yes", rejected ones in " no", with fillers of different lengths (so the learner's
    length-sorted micro-batches meet pairs of different lengths)."""
    return [{"prompt": f"Question {i}: is {i} a number?\n", "chosen": "well " * (i % 3) + "yes",
             "rejected": "hmm " * ((i + 1) % 4) + "no"} for i in range(start, start + n)]


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("changes, key", [
    ({"source": "learned"}, "reward.source"),
    ({"source": "gated"}, "reward.model"),                       # a source that needs a model, none given
    ({"source": "model", "model": "/no/such/rm"}, "reward.model"),
    ({"model_weight": 0.0}, "reward.model_weight"),
    ({"model_weight": float("nan")}, "reward.model_weight"),
    ({"model_num_workers": 0}, "reward.model_num_workers"),
    ({"model_batch_size": 0}, "reward.model_batch_size"),
    ({"model_max_tokens": 1}, "reward.model_max_tokens"),
    ({"model_timeout_s": 0.0}, "reward.model_timeout_s"),
])
def test_reward_config_errors_name_the_key(changes, key):
    cfg = TrainConfig()
    for k, v in changes.items():
        setattr(cfg.reward, k, v)
    with pytest.raises(ConfigError, match=f"config error at '{key}'"):
        validate(cfg)


def test_reward_config_accepts_each_source_with_a_model_folder(tmp_path):
    for source in ("verifier", "model", "sum", "gated"):
        cfg = TrainConfig()
        cfg.reward.source, cfg.reward.model = source, str(tmp_path)
        validate(cfg)
    cfg = TrainConfig()
    cfg.cluster.gpus_per_reward_model = -0.5
    with pytest.raises(ConfigError, match="cluster.gpus_per_reward_model"):
        validate(cfg)


def test_fleet_bundles_reserve_the_reward_models():
    from hicra_rl.fleet import fleet_bundles

    cfg = TrainConfig()
    assert not any(k.startswith("reward_model") for k in fleet_bundles(cfg.rollout, cfg.reward, cfg.cluster))
    cfg.reward.model, cfg.reward.model_num_workers, cfg.cluster.gpus_per_reward_model = "/rm", 2, 0.25
    bundles = fleet_bundles(cfg.rollout, cfg.reward, cfg.cluster)
    assert bundles["reward_model0"] == bundles["reward_model1"] == {"CPU": 0.25, "GPU": 0.25}


# ------------------------------------------------------------------------------------------ the folder check
def test_reward_model_folder_errors(tmp_path, tiny_rm, smollm2_tokenizer):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from hicra_rl.rewards.model import RewardModelScorer, check_reward_model_dir

    assert check_reward_model_dir(tiny_rm) == tiny_rm
    with pytest.raises(InputNotFoundError, match="reward.model: '/no/such/rm' is not an existing directory"):
        check_reward_model_dir("/no/such/rm")
    with pytest.raises(InputNotFoundError, match="has no config.json"):
        check_reward_model_dir(tmp_path)
    cfg = _tiny_config(smollm2_tokenizer)
    causal = tmp_path / "causal"
    LlamaForCausalLM(cfg).save_pretrained(causal)
    with pytest.raises(BadInputError, match="is a LlamaForCausalLM, not a sequence classifier with a scalar head"):
        check_reward_model_dir(causal)
    two = tmp_path / "two-labels"
    LlamaForSequenceClassification(_tiny_config(smollm2_tokenizer, num_labels=2)).save_pretrained(two)
    with pytest.raises(BadInputError, match="has a head of 2 outputs .*a reward model has one"):
        check_reward_model_dir(two)
    with pytest.raises(BadInputError, match="has a head of 2 outputs"):  # the scorer refuses it before loading
        RewardModelScorer(str(two))
    # a head whose weights are not in the checkpoint would be random: refused
    headless = tmp_path / "headless"
    LlamaForSequenceClassification(cfg).save_pretrained(headless)
    state = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("score.")}, headless / "model.safetensors")
    with pytest.raises(BadInputError, match=r"no weights for its scalar head \(score.weight\)"):
        check_reward_model_dir(headless)
    # the scorer checks every other weight at load (transformers' missing keys)
    partial = tmp_path / "partial"
    LlamaForSequenceClassification(cfg).save_pretrained(partial)
    smollm2_tokenizer.save_pretrained(partial)
    state = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, partial / "model.safetensors")
    with pytest.raises(BadInputError, match="weights missing from the checkpoint, so they would be random: "
                                            "model.norm.weight"):
        RewardModelScorer(str(partial))
    no_tok = tmp_path / "no-tokenizer"
    LlamaForSequenceClassification(cfg).save_pretrained(no_tok)
    with pytest.raises(InputNotFoundError, match="has no tokenizer files"):
        check_reward_model_dir(no_tok)


# ------------------------------------------------------------------------------------------ pair files
@pytest.mark.parametrize("line, field, reason", [
    ('{"prompt": "p", "chosen": "a"}', "rejected", "missing"),
    ("not json", "<json>", "not valid JSON at column 1"),
    ('[1, 2]', "<row>", "expected an object with prompt, chosen, rejected, got list"),
    ('{"prompt": "p", "chosen": 1, "rejected": "b"}', "chosen", "expected a string, got int"),
    ('{"prompt": "  ", "chosen": "a", "rejected": "b"}', "prompt", "empty"),
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "rejected", "identical to chosen"),
])
def test_bad_pair_rows_are_one_line_naming_file_row_field(tmp_path, line, field, reason):
    from hicra_rl.data.preferences import load_preference_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(BadInputError) as info:
        load_preference_pairs(path)
    msg = one_line(info.value)
    assert msg.startswith(f"{path}: row 2: field '{field}': {reason}") and "\n" not in str(info.value)


def test_good_pair_rows_and_a_missing_file(tmp_path):
    from hicra_rl.data.preferences import load_preference_pairs

    path = pairs_file(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "id": "x"},
                                             {"prompt": "q", "chosen": "c", "rejected": "d"}])
    pairs = load_preference_pairs(path)
    assert [(p.row, p.id, p.chosen) for p in pairs] == [(1, "x", "a"), (2, "p-2", "c")]
    with pytest.raises(InputNotFoundError, match="does not exist"):
        load_preference_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(BadInputError, match="no preference pairs"):
        load_preference_pairs(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------------------ training
def test_bt_through_gradient_step_equals_a_direct_computation(tiny_rm, monkeypatch):
    """Two pairs in two micro-batches (one pair each): the learner's loss is the mean over both pairs and its
    gradient norm that of the direct full-batch loss on the same weights."""
    from learner_fixtures import free_port
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hicra_rl.config import LearnerConfig
    from hicra_rl.learner.reward_model import RewardLearner, pair_sequences
    from hicra_rl.rewards.model import encode_pair

    tok = AutoTokenizer.from_pretrained(tiny_rm)
    raw = separable_pairs(0, 2)
    enc = [(encode_pair(tok, p["prompt"], p["chosen"], 64)[0], encode_pair(tok, p["prompt"], p["rejected"], 64)[0])
           for p in raw]
    learner = RewardLearner(LearnerConfig(zero_stage=0, lr=1e-3, micro_batch_size=2, max_grad_norm=0.0),
                            model_path=tiny_rm, master_port=free_port())
    ids, am, rm = pair_sequences(enc, learner.pad_id)
    assert learner.pad_id == tok.pad_token_id and rm.sum(-1).tolist() == [1, 1, 1, 1]

    direct = AutoModelForSequenceClassification.from_pretrained(tiny_rm, dtype=torch.float32)
    scores = torch.stack([direct(input_ids=torch.tensor([x])).logits[0, 0] for pair in enc for x in pair])
    margins = scores[0::2] - scores[1::2]
    loss = torch.nn.functional.softplus(-margins).mean()
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in direct.parameters()
                                                      if p.grad is not None]))

    # the learner's no-gradient scores are the plain model's (HF pooling at the last non-pad token)
    torch.testing.assert_close(learner.scores(ids, am, rm), scores.detach(), atol=1e-5, rtol=0)
    stats = learner.train_pairs(ids, am, rm)
    assert stats["rm/loss"] == pytest.approx(float(loss.detach()), abs=1e-5)
    assert stats["rm/accuracy"] == pytest.approx(float(((margins > 0).float()).mean()))
    assert stats["rm/margin"] == pytest.approx(float(margins.detach().mean()), abs=1e-5)
    assert stats["rm/grad_norm"] == pytest.approx(float(grad_norm), rel=1e-4)
    assert stats["rm/nonfinite_skipped"] == 0.0
    # one optimizer step on the separable pairs: the loss on them went down
    after = learner.scores(ids, am, rm)
    assert float(torch.nn.functional.softplus(-(after[0::2] - after[1::2])).mean()) < float(loss.detach())
    learner.close()


def separable_rm_config(root, tiny_rm: str, lr: float):
    """``hicra-rm train``'s config for 12 separable training pairs and 4 held-out ones (other questions) in ``root``:
    4 epochs of 3 steps (4 pairs a step, 2 a micro-batch)."""
    from hicra_rl.rm import RMTrainConfig

    cfg = RMTrainConfig()
    cfg.model.path = tiny_rm
    cfg.train_pairs = pairs_file(root / "train.jsonl", separable_pairs(0, 12))
    cfg.eval_pairs = pairs_file(root / "eval.jsonl", separable_pairs(100, 4))
    cfg.out_dir = str(root / "rm")
    cfg.epochs, cfg.batch_pairs, cfg.micro_batch_pairs, cfg.lr, cfg.max_tokens = 4, 4, 2, lr, 64
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_rm):
    """``hicra-rm train`` (in process) on 12 separable pairs, held out: 4 pairs of other questions."""
    from hicra_rl.rm import run_rm_train

    cfg = separable_rm_config(tmp_path_factory.mktemp("rm-train"), tiny_rm, lr=3e-3)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MASTER_PORT", raising=False)
        result = run_rm_train(cfg)
    return cfg, result


def test_training_reaches_heldout_pair_accuracy_one(trained):
    cfg, result = trained
    history = result["history"]
    assert [row["epoch"] for row in history] == [0, 1, 2, 3, 4]
    assert history[0]["eval/pair_accuracy"] < 1.0  # the new head ranks them at random before training
    assert history[-1]["eval/pair_accuracy"] == 1.0 and history[-1]["eval/pairs"] == 4.0
    assert history[-1]["eval/loss"] < history[0]["eval/loss"]
    assert history[-1]["train/steps"] == 3  # 12 pairs / 4 per step
    saved = json.loads((__import__("pathlib").Path(result["out_dir"]) / "rm_history.json").read_text())
    assert saved["history"][-1]["eval/pair_accuracy"] == 1.0


def test_the_checkpoint_loads_in_the_scorer_as_is(trained):
    from hicra_rl.rewards.model import RewardModelScorer, check_reward_model_dir

    cfg, result = trained
    config = json.loads(open(os.path.join(result["out_dir"], "config.json")).read())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] is not None
    check_reward_model_dir(result["out_dir"])
    scorer = RewardModelScorer(result["out_dir"], batch_size=3, max_tokens=cfg.max_tokens)
    held = separable_pairs(100, 4)
    scores = scorer.score([(p["prompt"], r) for p in held for r in (p["chosen"], p["rejected"])])
    margins = [scores[2 * k] - scores[2 * k + 1] for k in range(4)]
    assert all(m > 0 for m in margins)
    # what the learner measured on the same pairs before saving
    assert sum(margins) / 4 == pytest.approx(result["history"][-1]["eval/margin"], abs=1e-4)
    assert scorer.stats()["reward_model/items"] == 8.0


def test_lora_reward_learner_trains_only_the_adapters_and_the_head(tiny_rm):
    """LoRA rank 2 on q_proj, v_proj of the 2-layer tiny classifier: trainable = 2 layers x 2 modules x
    (A [2 x 64] + B [out x 2]) + the head [1 x 64]; one step moves exactly those, and only they have AdamW
    moments."""
    from learner_fixtures import free_port
    from transformers import AutoTokenizer

    from hicra_rl.config import LearnerConfig, LearnerLoraConfig
    from hicra_rl.learner.reward_model import RewardLearner, pair_sequences
    from hicra_rl.rewards.model import encode_pair

    tok = AutoTokenizer.from_pretrained(tiny_rm)
    enc = [(encode_pair(tok, p["prompt"], p["chosen"], 64)[0], encode_pair(tok, p["prompt"], p["rejected"], 64)[0])
           for p in separable_pairs(0, 2)]
    lora = LearnerLoraConfig(rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    learner = RewardLearner(LearnerConfig(zero_stage=0, lr=1e-2, micro_batch_size=2, max_grad_norm=0.0, lora=lora),
                            model_path=tiny_rm, master_port=free_port())
    # q_proj: 64 -> 64; v_proj: 64 -> 2 kv heads x 16 = 32
    expected = 2 * ((2 * 64 + 64 * 2) + (2 * 64 + 32 * 2)) + 64
    assert learner.trainable_params == expected
    module = learner.engine.module
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    learner.train_pairs(*pair_sequences(enc, learner.pad_id))
    moved = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(".lora_" in n or ".modules_to_save.default." in n for n in moved), sorted(moved)
    assert "base_model.model.score.modules_to_save.default.weight" in moved   # the head trains in full
    assert learner.optimizer_state_numel() == 2 * expected
    # the merged weights: the base model's names; the head is the trained copy
    merged = learner.full_state_dict()
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_rm, dtype=torch.float32).state_dict()
    assert set(merged) == set(base)
    torch.testing.assert_close(merged["score.weight"],
                               dict(module.named_parameters())["base_model.model.score.modules_to_save.default.weight"])
    assert not torch.equal(merged["score.weight"], base["score.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    learner.close()


def test_hicra_rm_train_with_lora_saves_a_merged_model_the_scorer_loads(tmp_path, tiny_rm):
    """``hicra-rm train lora.rank=4`` on the separable pairs: held-out pair accuracy 1.0, and the saved folder is
    a plain sequence classifier (no adapter names) that scores the held-out pairs as the learner measured them."""
    from safetensors.torch import load_file

    from hicra_rl.rewards.model import RewardModelScorer, check_reward_model_dir
    from hicra_rl.rm import run_rm_train

    cfg = separable_rm_config(tmp_path, tiny_rm, lr=1e-2)
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MASTER_PORT", raising=False)
        result = run_rm_train(cfg)
    assert result["history"][-1]["eval/pair_accuracy"] == 1.0
    check_reward_model_dir(result["out_dir"])
    keys = set(load_file(os.path.join(result["out_dir"], "model.safetensors")))
    assert "score.weight" in keys and not any("lora_" in k or "modules_to_save" in k or "base_layer" in k
                                              for k in keys)
    scorer = RewardModelScorer(result["out_dir"], batch_size=3, max_tokens=cfg.max_tokens)
    held = separable_pairs(100, 4)
    scores = scorer.score([(p["prompt"], r) for p in held for r in (p["chosen"], p["rejected"])])
    margins = [scores[2 * k] - scores[2 * k + 1] for k in range(4)]
    assert sum(margins) / 4 == pytest.approx(result["history"][-1]["eval/margin"], abs=1e-4)


def test_bad_rm_lora_settings_are_config_errors():
    from hicra_rl.rm import RMTrainConfig, validate_rm

    cfg = RMTrainConfig()
    cfg.lora.rank, cfg.lora.alpha = 4, 0.0
    with pytest.raises(ConfigError, match="lora.alpha"):
        validate_rm(cfg)


def test_nonfinite_scores_are_reported_never_zero(trained):
    from hicra_rl.rewards.combine import NonFiniteScoresError, combine_rewards
    from hicra_rl.rewards.model import RewardModelScorer

    scorer = RewardModelScorer(trained[1]["out_dir"])
    with torch.no_grad():
        scorer.model.score.weight.fill_(float("nan"))
    scores = scorer.score([("Question 1: is 1 a number?\n", "yes"), ("Question 1: is 1 a number?\n", "no")])
    assert all(math.isnan(s) for s in scores) and scorer.stats()["reward_model/nonfinite"] == 2.0
    with pytest.raises(NonFiniteScoresError):
        combine_rewards("model", [1.0, 0.0], [True, False], scores, 1.0, [0, 0])


def test_long_texts_keep_their_last_tokens(trained, tiny_rm):
    from transformers import AutoTokenizer

    from hicra_rl.rewards.model import encode_pair

    tok = AutoTokenizer.from_pretrained(tiny_rm)
    full, cut = encode_pair(tok, "a b c d e f g h ", "so yes", 1000)
    assert not cut
    ids, cut = encode_pair(tok, "a b c d e f g h ", "so yes", 3)
    assert cut and ids == full[-3:]


def test_worker_reports_a_call_over_its_time_limit(trained):
    from hicra_rl.actors import RewardModelWorker

    worker = RewardModelWorker(trained[1]["out_dir"], dtype="float32", batch_size=4, max_tokens=64, time_limit_s=30)
    now = [1000.0]
    worker._clock = lambda: now[0]
    assert worker.health() is None
    assert worker.score([("Question 7: is 7 a number?\n", "yes")])[0] == pytest.approx(
        worker.scorer.score([("Question 7: is 7 a number?\n", "yes")])[0])
    worker._busy_since = now[0]
    now[0] += 29
    assert worker.health() is None
    now[0] += 2
    assert "over reward.model_timeout_s=30" in worker.health()


# ------------------------------------------------------------------------------------------ the trainer step
def test_trainer_step_combines_and_measures_the_model(tmp_path):
    """FakeFleet of tests/test_trainer_step.py: sample 0 of each prompt is right (verifier 1), sample 1 wrong (0);
    the fake reward model scores the right one 0 and the wrong one 3 (it disagrees with the verifier)."""
    from test_trainer_step import FakeFleet, make_trainer

    calls = []

    def score_model(pairs):
        calls.append(pairs)
        return [0.0 if text.endswith(" 7") else 3.0 for _, text in pairs]

    for source, expected_mean in (("gated", (1 + 2 * 0.5 + 0) / 2), ("model", (0 + 2 * 3) / 2),
                                  ("sum", (1 + 0 + 0 + 6) / 2), ("verifier", 0.5)):
        trainer, metrics = make_trainer(tmp_path / source)
        trainer.cfg.reward.source, trainer.cfg.reward.model, trainer.cfg.reward.model_weight = source, "/rm", 2.0
        trainer.fleet.score_model = score_model
        m = trainer.train_step(0)
        metrics.close()
        assert m["reward/mean"] == pytest.approx(expected_mean), source
        assert m["reward/accuracy"] == 0.5  # correctness stays the verifier's
        assert m["reward/model_mean"] == 1.5 and m["reward/model_std"] == 1.5
        assert m["reward/model_verifier_agreement"] == 0.0 and m["reward/model_verifier_pairs"] == 2.0
        assert m["timing/reward_model_s"] >= 0.0
    # the model read the prompt text the policy saw and the response text, for each response
    assert len(calls[0]) == 4 and all(p in {q.text for q in trainer.prompts} for p, _ in calls[0])
    assert [t for _, t in calls[0]] == FakeFleet().generate([[1], [2]], 2, 1.0, 8, 0).response_texts


# ------------------------------------------------------------------------------------------ the command lines
def test_cli_errors_are_one_line(tmp_path, tiny_rm, smollm2_tokenizer):
    from test_cli_errors import assert_one_line, run_cli
    from transformers import LlamaForCausalLM

    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    out = run_cli("hicra-rm", "train", f"model.path={tiny_rm}", f"train_pairs={bad}", f"out_dir={tmp_path}/rm",
                  cwd=tmp_path)
    assert_one_line(out, "hicra-rm train", f"{bad}: row 2: field 'rejected': missing")
    out = run_cli("hicra-rm", "train", f"train_pairs={tmp_path}/nope.jsonl", f"out_dir={tmp_path}/rm", cwd=tmp_path)
    assert_one_line(out, "hicra-rm train", "config error at 'train_pairs'", "nope.jsonl")
    run = [f"model.path={tiny_rm}", f"trainer.run_dir={tmp_path}/run"]
    out = run_cli("hicra-train", *run, "reward.source=gated", cwd=tmp_path)
    assert_one_line(out, "hicra-train", "config error at 'reward.model'", "reward.source=gated needs a reward model")
    causal = tmp_path / "causal"
    LlamaForCausalLM(_tiny_config(smollm2_tokenizer)).save_pretrained(causal)
    out = run_cli("hicra-train", *run, "reward.source=sum", f"reward.model={causal}", cwd=tmp_path)
    assert_one_line(out, "hicra-train", f"reward.model: {causal} is a LlamaForCausalLM, not a sequence classifier")
    out = run_cli("hicra-rm", cwd=tmp_path)
    assert out.returncode == 2 and "usage: hicra-rm {train,pairs}" in out.stderr


def test_cfg_job_shows_the_new_keys(tmp_path):
    from test_cli_errors import run_cli

    out = run_cli("hicra-train", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("  source: verifier", "  model: null", "  model_weight: 1.0", "  model_timeout_s: 120.0",
                 "  gpus_per_reward_model: 0.0"):
        assert line in out.stdout.splitlines(), line


# ------------------------------------------------------------------------------------------ hicra-rm pairs
def test_rm_pairs_writes_heldout_pairs_from_train_and_eval_roles(tmp_path, tiny_rm, monkeypatch):
    """``hicra-rm pairs`` at a tiny scale with an in-process fleet: every even sample is right, every odd one
    wrong.  Training pairs come from train-role problems, held-out ones from eval-role problems (disjoint), in
    the format ``hicra-rm train`` reads."""
    from contextlib import contextmanager

    from hicra_rl import fleet as fleet_module
    from hicra_rl.batch import RolloutBatch
    from hicra_rl.data.preferences import load_preference_pairs
    from hicra_rl.rewards.pool import VerifyResult
    from hicra_rl.rm import RMPairsConfig, run_rm_pairs

    class AlternatingFleet:
        def generate(self, prompt_ids, n, temperature, max_tokens, seed):
            rows = [(g, j) for g in range(len(prompt_ids)) for j in range(n)]
            return RolloutBatch(prompt_ids=[list(prompt_ids[g]) for g, _ in rows], response_ids=[[1] for _ in rows],
                                sampling_logprobs=[[0.0] for _ in rows], finish_reasons=["stop"] * len(rows),
                                group_ids=[g for g, _ in rows],
                                response_texts=[f"answer {j} of {g}" for g, j in rows])

        def score(self, batch):
            return [VerifyResult(1.0 * (t[7] in "02"), t[7] in "02", False, 0.0, t) for t in batch.response_texts]

    seen = {}

    @contextmanager
    def fake_session(**kwargs):
        seen.update(kwargs)

        class Session:
            fleet = AlternatingFleet()

            def wait_ready(self):
                pass

        yield Session()

    monkeypatch.setattr(fleet_module, "FleetSession", fake_session)
    cfg = RMPairsConfig()
    cfg.model.path, cfg.out_dir, cfg.k, cfg.max_pairs_per_problem = tiny_rm, str(tmp_path / "pairs"), 4, 3
    cfg.data.size, cfg.eval_data.size = 3, 2
    cfg.data.task_config = cfg.eval_data.task_config = {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                        "max_digits": 2, "operators": ["+", "-"]}
    summary = run_rm_pairs(cfg)
    assert seen["reward_cfg"].model is None  # no reward model while the pairs are made
    train = load_preference_pairs(tmp_path / "pairs" / "train.jsonl")
    held = load_preference_pairs(tmp_path / "pairs" / "eval.jsonl")
    # k = 4 per problem: answers 0 and 2 right, 1 and 3 wrong -> 4 combinations, capped at 3 per problem
    assert len(train) == 3 * 3 and len(held) == 2 * 3
    assert {p.chosen.split(" of ")[0] for p in train} == {"answer 0", "answer 2"}
    assert {p.rejected.split(" of ")[0] for p in train} == {"answer 1", "answer 3"}
    assert not {p.prompt for p in train} & {p.prompt for p in held}  # held out by construction
    assert all(p.prompt.endswith("<|im_start|>assistant\n") for p in train)  # the chat-templated prompt
    assert summary["train"]["role"] == "train" and summary["eval"]["role"] == "eval"
    assert summary["train"]["accuracy"] == 0.5 and summary["train"]["mixed_problems"] == 3.0
    with pytest.raises(Exception, match="exists; set overwrite=true"):
        run_rm_pairs(cfg)
