"""Trainer -> engine weight sync: one protocol (a manifest, then buckets), four transports (direct,
CUDA IPC, NCCL/gloo process groups, disk). See ``sender.WeightSender`` and ``receiver.WeightReceiver``."""

from rollout.weight_sync.manifest import Manifest, plan_buckets
from rollout.weight_sync.sender import WeightSender

__all__ = ["Manifest", "WeightSender", "plan_buckets"]
