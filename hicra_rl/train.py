"""``hicra-train``: the Hydra entry point (also ``python -m hicra_rl.train``)."""
from __future__ import annotations

import os

from hicra_rl.config import CONF_DIR, TrainConfig, hydra_entry, register_configs, validate

__all__ = ["CONF_DIR", "main"]
register_configs()  # the schema is in the ConfigStore for Hydra's compose API as soon as this is imported


def run(cfg: TrainConfig) -> None:
    import sys

    from hicra_rl.cluster import ComponentDied, ComponentTimeout
    from hicra_rl.driver import Interrupted, RunAlreadyComplete, train
    from hicra_rl.errors import hydra_full_error, one_line

    try:
        history = train(cfg)
    except RunAlreadyComplete as done:  # nothing to do: say so before starting anything (exit 0)
        print(f"hicra-train: {done}", file=sys.stderr)
        return
    except (ComponentDied, ComponentTimeout) as err:  # a component died past its restarts, or hung: one line
        if hydra_full_error():
            raise
        print(f"hicra-train: {one_line(err)}. The run stopped and every actor closed; the same command resumes "
              f"from the newest checkpoint in {os.path.abspath(cfg.trainer.run_dir)}/checkpoints", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: actors closed, Ray stopped; resume continues
        why = Interrupted.last_signal
        print(f"hicra-train: stopped by {why}; every actor closed. The same command resumes from the newest "
              f"checkpoint in {os.path.abspath(cfg.trainer.run_dir)}/checkpoints", file=sys.stderr)
        sys.exit(130)
    if history:
        print(f"done: {len(history)} steps this run; metrics in {os.path.abspath(cfg.trainer.run_dir)}/metrics.jsonl")


def main() -> None:
    hydra_entry("hicra-train", "config", TrainConfig, validate, run)


if __name__ == "__main__":
    main()
