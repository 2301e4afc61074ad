"""DeepSpeed policy learner (one per data-parallel rank) and its atomic checkpoints."""
from hicra_rl.learner.checkpoint import find_latest_complete, load_checkpoint, save_checkpoint
from hicra_rl.learner.engine import LearnerConfig, PolicyBatch, PolicyLearner
from hicra_rl.learner.sequences import build_sequences

__all__ = ["LearnerConfig", "PolicyBatch", "PolicyLearner", "build_sequences", "find_latest_complete",
           "load_checkpoint", "save_checkpoint"]
