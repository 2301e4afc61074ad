"""Does the reward model pay for bigger final answers?  A probe of the CPU example's RM (docs/reward_models.md).

    python benchmarks/rm_answer_probe.py [--run runs/rm_cpu/model-s0] [--rm DIR] [--n 64] [--shift 10]

Takes the first response of each of the first ``--n`` problems of the run's step-0 evaluation (the cold start's
answers to held-out problems, with the prompts rebuilt by the data code from the run's config), moves only the
number in its final ``\\boxed{}`` by -shift and +shift, and scores the three versions with the reward model
(``RewardModelScorer``, as the pool does). Prints the mean score change and the share of responses whose score
rose, for each direction.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def shifted(response: str, delta: int) -> str | None:
    """``response`` with the integer in its last ``\\boxed{}`` moved by ``delta`` (None: no integer answer)."""
    matches = list(re.finditer(r"\\boxed\{(-?\d+)\}", response))
    if not matches:
        return None
    m = matches[-1]
    return response[:m.start(1)] + str(int(m.group(1)) + delta) + response[m.end(1):]


def eval_prompt_texts(config: dict) -> dict[str, str]:
    """Problem id -> the chat-templated prompt the policy saw, for the run's held-out problems."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from hicra_rl.config import to_schema
    from hicra_rl.data.setup import load_problem_set, prompts_of

    cfg = to_schema(OmegaConf.create(config))
    train = load_problem_set(cfg.data, cfg.trainer.seed, role="train")
    held = load_problem_set(cfg.eval_data, cfg.eval_data.seed, role="eval", exclude=train)
    tok = AutoTokenizer.from_pretrained(os.path.expanduser(cfg.trainer.init_checkpoint or cfg.model.path))
    return {p.id: p.text for p in prompts_of(cfg.eval_data, tok, held).prompts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/rm_cpu/model-s0")
    p.add_argument("--rm", default=os.path.expanduser("~/.cache/hicra-rl/reward_models/smollm2_135m-arith"))
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--shift", type=int, default=10)
    args = p.parse_args(argv)
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    texts = eval_prompt_texts(config)
    items = []
    for row in json.loads((run / "eval-step0.json").read_text())["rows"][:args.n]:
        versions = [shifted(row["responses"][0], d) for d in (-args.shift, 0, args.shift)]
        if None not in versions:
            items.append((texts[row["id"]], versions))
    from hicra_rl.rewards.model import RewardModelScorer

    scorer = RewardModelScorer(args.rm, batch_size=16, max_tokens=512)
    scores = scorer.score([(prompt, v) for prompt, versions in items for v in versions])
    down = [scores[3 * k] - scores[3 * k + 1] for k in range(len(items))]
    up = [scores[3 * k + 2] - scores[3 * k + 1] for k in range(len(items))]
    print(f"{len(items)} cold-start responses to held-out problems, final answer moved by ±{args.shift}, RM {args.rm}")
    for name, diffs in ((f"+{args.shift}", up), (f"-{args.shift}", down)):
        print(f"answer {name}: score change mean {statistics.mean(diffs):+.3f}, "
              f"rose for {sum(d > 0 for d in diffs) / len(diffs):.2f} of them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
