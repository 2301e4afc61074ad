"""hicra-rl."""
