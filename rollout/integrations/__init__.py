"""Trainer-facing adapters: ``RolloutClient`` (local or HTTP) for RL loops, a TRL ``rollout_func``
(``rollout.integrations.trl``), a verl-style ``RolloutWorker`` (``rollout.integrations.verl``), prompt
sets from local files (``rollout.integrations.data``) and a complete GRPO loop
(``rollout.integrations.grpo``, run by ``rollout demo grpo``)."""

from rollout.integrations.http_rollout_client import HTTPRolloutClient
from rollout.integrations.rollout_client import (
    PaddedRollout,
    RolloutBatch,
    RolloutClient,
    sequence_logprobs,
)
from rollout.integrations.verl import RolloutWorker

__all__ = [
    "HTTPRolloutClient",
    "PaddedRollout",
    "RolloutBatch",
    "RolloutClient",
    "RolloutWorker",
    "sequence_logprobs",
]
