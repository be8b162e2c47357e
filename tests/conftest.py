"""Shared test setup: hermetic preset cache, GPU tests skipped without CUDA, few CPU threads."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="session")
def _preset_cache(tmp_path_factory: pytest.TempPathFactory):
    """Build presets (the tiny model) into a per-session directory, never into the user's cache."""
    previous = os.environ.get("ROLLOUT_CACHE")
    os.environ["ROLLOUT_CACHE"] = str(tmp_path_factory.mktemp("rollout-cache"))
    yield
    if previous is None:
        os.environ.pop("ROLLOUT_CACHE", None)
    else:
        os.environ["ROLLOUT_CACHE"] = previous


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
