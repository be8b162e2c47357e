"""Sampling: per-request parameters, per-step tensors, and the sync-free sampler."""

from rollout.samplers.params import MAX_LOGPROBS, SamplingParams
from rollout.samplers.sampler import SamplerOutput, prompt_logprobs, sample
from rollout.samplers.tensors import RowSampling, SamplingTensors

__all__ = [
    "MAX_LOGPROBS",
    "RowSampling",
    "SamplerOutput",
    "SamplingParams",
    "SamplingTensors",
    "prompt_logprobs",
    "sample",
]
