"""rollout-engine: a rollout engine for reinforcement learning on LLMs."""

from rollout.async_llm import AsyncLLM
from rollout.client import EngineDeadError
from rollout.config import CacheConfig, RunnerConfig, SchedulerConfig
from rollout.engine import EngineCore, EngineStats
from rollout.llm import LLM
from rollout.outputs import CompletionOutput, RequestOutput
from rollout.samplers.params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "EngineDeadError",
    "CacheConfig",
    "CompletionOutput",
    "EngineCore",
    "EngineStats",
    "RequestOutput",
    "RunnerConfig",
    "SamplingParams",
    "SchedulerConfig",
]
__version__ = "0.1.0"
