"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest

from rollout.samplers.tensors import SamplingTensors


@pytest.fixture
def sampling_builds(monkeypatch) -> list[int]:
    """The batch size of every SamplingTensors build (``from_columns``) from now on; the real build
    still runs, so steps that reuse their tensors leave no entry."""
    builds: list[int] = []
    build = SamplingTensors.from_columns

    def counted(cls, values, *args):
        builds.append(len(values))
        return build(values, *args)

    monkeypatch.setattr(SamplingTensors, "from_columns", classmethod(counted))
    return builds
