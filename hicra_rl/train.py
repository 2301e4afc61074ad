"""``hicra-train``: the Hydra entry point (also ``python -m hicra_rl.train``)."""
from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from hicra_rl.config import ConfigError, register_configs, to_schema

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
register_configs()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = to_schema(dcfg)
    except ConfigError as err:
        print(f"hicra-train: {err}", file=sys.stderr)
        sys.exit(2)
    from hicra_rl.driver import train

    history = train(cfg)
    if history:
        print(f"done: {len(history)} steps this run; metrics in {os.path.abspath(cfg.trainer.run_dir)}/metrics.jsonl")


if __name__ == "__main__":
    main()
