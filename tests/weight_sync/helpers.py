"""Shared pieces of the weight-sync tests: two tiny checkpoints (the served one, the new one) and a
comparison of what two engines compute on the same prompts."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from rollout import SamplingParams
from tests.models.tiny_models import save_tiny_checkpoint

PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 8, 1, 9, 200, 31, 77, 12, 18], [4, 4, 8, 15, 16, 23, 42]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=0)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """``old``: the directory engines start from; ``new_dir`` / ``new_model``: the update."""
    root = tmp_path_factory.mktemp("weight_sync")
    save_tiny_checkpoint(root / "old", "qwen3", seed=0)
    new_model = save_tiny_checkpoint(root / "new", "qwen3", seed=1)
    return {"old": str(root / "old"), "new_dir": str(root / "new"), "new_model": new_model}


def fingerprint(outs) -> list[tuple[list[int], list[float], list[float | None]]]:
    """Greedy tokens, their logprobs and the prompt logprobs of every prompt (the logits' imprint)."""
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outs]


def assert_same(a, b, atol: float = 1e-5) -> None:
    for (ta, la, pa), (tb, lb, pb) in zip(a, b, strict=True):
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) <= atol
        assert max(abs(x - y) for x, y in zip(pa[1:], pb[1:], strict=True)) <= atol


def write_dir(path: Path, model) -> str:
    model.save_pretrained(path)
    return str(path)


def _rank_main(target: Callable, rank: int, port: int, *args: object) -> None:
    """A rank process: ``target``, then (when it returned) an exit without the interpreter's. A gloo
    thread torn down by a C++ destructor at interpreter exit aborted a rank now and then ("terminate
    called without an active exception", exit code -6) after every result was in; the results
    queue is flushed first."""
    target(rank, port, *args)
    results = args[-1]
    results.close()
    results.join_thread()
    os._exit(0)


@contextlib.contextmanager
def two_ranks(target: Callable, *args: object) -> Iterator[object]:
    """Two spawned processes run ``target(rank, port, *args, results)`` (rank 0 hosts the default
    group on a free ``port``); the block gets the ``results`` queue. When it ends both must have
    exited with status 0; a rank still alive then (its peer failed and left it waiting in a
    collective) is terminated."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(target, rank, port, *args, results)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        yield results
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
