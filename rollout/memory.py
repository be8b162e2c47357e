"""Sleep and wake: give a colocated trainer the engine's device memory between rollout phases.

``sleep(1)`` frees the KV cache and moves the weights to (pinned) host memory; ``sleep(2)`` frees
the weights too, so they must be sent again (``update_weights``) after ``wake_up(["weights"])``.
``wake_up`` restores the tags asked for ("weights", "kv_cache"; both by default). With
``RunnerConfig(sleep_keeps_graphs=False)`` sleep also frees the CUDA graphs, and once both tags are
back they are captured again over the new storage, so every graph is valid after a wake.
Parameters keep their identity (only their ``.data`` moves), so ``named_parameters()``, weight
loaders and tied embeddings keep working.

With ``sleep_keeps_graphs=True`` (the default) on CUDA the weights (packed in one range) and the
KV cache sit in ``rollout.vmm`` address ranges: sleep gives their physical memory back and keeps
the ranges, wake maps new memory at the same addresses, and the CUDA graphs are kept instead of
captured again (their own memory pools stay allocated through the sleep).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rollout.model_runner import ModelRunner
from rollout.vmm import parameter_layout, parameter_views

TAGS = ("weights", "kv_cache")


@dataclass
class _Asleep:
    level: int
    host_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # level 1: the weights
    shapes: dict[str, tuple[torch.Size, torch.dtype]] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)  # tags still released


class DeviceMemory:
    """Releases and restores one model runner's weights and KV cache."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._asleep: _Asleep | None = None
        self._host: torch.Tensor | None = None  # pinned host copy of the weights (level 1)

    @property
    def level(self) -> int:
        """0 when fully awake, else the level of the current sleep."""
        return 0 if self._asleep is None else self._asleep.level

    @property
    def released(self) -> set[str]:
        return set() if self._asleep is None else set(self._asleep.released)

    @property
    def weights_on_device(self) -> bool:
        return "weights" not in self.released

    @torch.no_grad()  # not inference_mode: the new storage must stay writable by weight updates
    def sleep(self, level: int) -> dict[str, float]:
        """Release memory; returns what was freed (bytes measured with ``mem_get_info`` on CUDA)."""
        if isinstance(level, bool) or not isinstance(level, int) or level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        if self._asleep is not None:
            raise ValueError(f"the engine is already asleep (level {self._asleep.level})")
        runner = self.runner
        before = _device_free(runner.device)  # synchronizes: no step in flight uses what goes
        asleep = _Asleep(level)
        params = _unique_params(runner.model)
        kv_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
        weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
        if runner.weight_memory is not None:
            self._release_in_place(asleep)
        else:
            self._release(asleep, params)
        asleep.released = set(TAGS)
        self._asleep = asleep
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
        after = _device_free(runner.device)
        return {
            "level": level,
            "kv_cache_bytes": kv_bytes,  # what was released, by tensor size
            "weight_bytes": weight_bytes,
            "freed_bytes": after - before,  # device memory freed, measured (0 off CUDA)
            "device_free_bytes": after,
        }

    def _host_buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        """The (pinned) host buffer of level-1 sleeps, at least ``nbytes``. Kept across sleeps:
        pinning host memory costs far more than the copy (seconds for an 8B model), and an RL loop
        sleeps every step."""
        if self._host is None or self._host.numel() < nbytes:
            self._host = None
            self._host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return self._host

    def _release_in_place(self, asleep: _Asleep) -> None:
        """Sleep with the weights and the KV cache in ``rollout.vmm`` ranges: their physical memory
        goes, their addresses, tensors and the graphs over them stay."""
        runner = self.runner
        assert runner.weight_memory is not None and runner.kv_memory is not None
        runner.drop_step_state()
        if asleep.level == 1:
            packed = runner.weight_memory.tensor()[: runner.weight_bytes]
            self._host_buffer(runner.weight_bytes, pin=True)[: runner.weight_bytes].copy_(packed)
        torch.cuda.synchronize(runner.device)  # nothing in flight reads what goes
        runner.kv_memory.release()
        runner.weight_memory.release()

    def _release(self, asleep: _Asleep, params: dict[str, nn.Parameter]) -> None:
        """Sleep by freeing the graphs, the KV cache and every parameter's storage."""
        runner = self.runner
        runner.release_graphs()  # frees the graphs' memory pools
        runner.drop_step_state()
        runner._bind_kv_cache(None)
        runner.kv_cache = None
        pin = runner.device.type == "cuda"
        asleep.shapes = {name: (p.shape, p.dtype) for name, p in params.items()}
        if asleep.level == 1:
            offsets, need = parameter_layout(params)
            asleep.host_weights = parameter_views(params, offsets, self._host_buffer(need, pin))
            for name, view in asleep.host_weights.items():
                view.copy_(params[name].data, non_blocking=pin)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)  # the host copies are done before storage goes
        for p in params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    @torch.no_grad()  # not inference_mode: the new storage must stay writable by weight updates
    def wake_up(self, tags: list[str] | None = None) -> dict[str, float]:
        """Restore ``tags`` (all by default); returns the device memory taken back."""
        tags = list(TAGS) if tags is None else tags
        if not isinstance(tags, list) or any(t not in TAGS for t in tags):
            raise ValueError(f"wake_up tags must be a list drawn from {TAGS}, got {tags!r}")
        asleep = self._asleep
        if asleep is None:
            return {"taken_bytes": 0.0, "recaptured": False}
        runner = self.runner
        before = _device_free(runner.device)
        in_place = runner.weight_memory is not None
        if "weights" in tags and "weights" in asleep.released:
            if runner.weight_memory is not None:  # the same addresses: parameters, graphs unchanged
                runner.weight_memory.restore()
                if asleep.level == 1:
                    assert self._host is not None
                    packed = runner.weight_memory.tensor()[: runner.weight_bytes]
                    packed.copy_(self._host[: runner.weight_bytes], non_blocking=True)
            else:
                for name, p in _unique_params(runner.model).items():
                    shape, dtype = asleep.shapes[name]
                    data = torch.empty(shape, dtype=dtype, device=runner.device)
                    if asleep.level == 1:
                        data.copy_(asleep.host_weights.pop(name), non_blocking=True)
                    p.data = data
            asleep.released.discard("weights")
        if "kv_cache" in tags and "kv_cache" in asleep.released:
            if runner.kv_memory is not None:
                assert runner.kv_cache is not None
                runner.kv_memory.restore()
                runner.kv_cache.zero_()  # as a new cache would be
            else:
                runner.kv_cache = runner._allocate_kv_cache(runner.num_blocks)
                runner._bind_kv_cache(runner.kv_cache)
            asleep.released.discard("kv_cache")
        recaptured = False
        if not asleep.released:
            self._asleep = None
            if not in_place:  # new storage: the graphs are captured again over it
                runner.capture_graphs()
                recaptured = runner.graphs is not None
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        return {"taken_bytes": before - _device_free(runner.device), "recaptured": recaptured}


def _unique_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())  # tied parameters appear once


def _device_free(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    return float(torch.cuda.mem_get_info(device)[0])
