"""Pure metric functions: semantic / token entropy, perplexity, Pass@k."""
from hicra_rl.metrics.entropy import conditional_entropy, semantic_entropy, shannon_entropy, split_token_means
from hicra_rl.metrics.passk import mean_pass_at_1, mean_pass_at_k, pass_at_k
from hicra_rl.metrics.perplexity import RelativePerplexity, split_perplexity

__all__ = [
    "RelativePerplexity",
    "conditional_entropy",
    "mean_pass_at_1",
    "mean_pass_at_k",
    "pass_at_k",
    "semantic_entropy",
    "shannon_entropy",
    "split_perplexity",
    "split_token_means",
]
