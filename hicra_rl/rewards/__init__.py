"""Rewards: answer extraction and math-verify equivalence (``math``), reasoning-gym tasks (``tasks``),
and time-bounded verification in killable worker processes (``pool``)."""
