"""What the host launches for a steady decode step outside the CUDA graphs, counted: the aten ops that
``ModelRunner.launch`` dispatches (a ``TorchDispatchMode``), by kind, and the Triton kernels it
launches from Python. On a GPU each op that is not a view or an allocation is a kernel or a copy the
host launches (~5-10 us of host time each on the H100's host), and at 1-4 rows the host is the
bound (stop 29), so fewer is faster there.

    rollout bench host_ops --batches 1 8 --graph-sampling --graph-inputs   (TRITON_INTERPRET=1 on a CPU)

It needs no GPU. On the CPU the engine runs the triton backend under Triton's interpreter with its
decode and sampler graphs uncaptured: their bodies are not counted (on CUDA they are inside the
graphs), and the eager sampler takes the fused kernel, as a CUDA step of these rows does. The counts
are the same on both devices but for one: a step that does not stage its inputs uploads them with
``.to(device)``, a copy on CUDA and a no-op (counted as a view) on the CPU. Times differ, so none
are printed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rollout.model_runner as model_runner
from rollout import LLM, SchedulerConfig
from rollout.benchmarks.common import add_graph_args, graph_config, patched
from rollout.benchmarks.step_profile import start_decode

# aten ops that only make tensor metadata (no device work); "to (no-op)": a ``to`` that returned its
# input (``.numpy()`` makes some, and on the CPU the step's ``.to(device)``)
VIEWS = frozenset(
    ["alias", "as_strided", "detach", "expand", "narrow", "permute", "resolve_conj", "resolve_neg",
     "select", "slice", "split", "split_with_sizes", "squeeze", "t", "transpose", "unflatten",
     "unsqueeze", "view", "_reshape_alias", "reshape", "to (no-op)"]
)  # fmt: skip
ALLOCATIONS = frozenset(["empty", "empty_like", "empty_strided", "new_empty"])


class OpCounter(TorchDispatchMode):
    """Names of the aten ops dispatched while active and not paused."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            name = func.overloadpacket.__name__
            self.ops.append("to (no-op)" if name == "to" and args and out is args[0] else name)
        return out

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def kinds(ops: list[str]) -> dict[str, int]:
    """Counts of views, allocations and the rest (device work on CUDA)."""
    views = sum(op in VIEWS for op in ops)
    allocations = sum(op in ALLOCATIONS for op in ops)
    return dict(ops=len(ops), views=views, allocations=allocations, work=len(ops) - views - allocations)


@contextlib.contextmanager
def triton_launches(counter: OpCounter, kernels: collections.Counter[str]) -> Iterator[None]:
    """Count ``kernel[grid](...)`` launches by kernel name while inside and ``counter`` is not
    paused, and pause it while a kernel runs (the interpreter runs kernels as torch ops)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import KernelInterface

    def counted(getitem: Any) -> Any:
        def counted_getitem(self: Any, grid: Any) -> Any:
            run = getitem(self, grid)

            def launch(*args: Any, **kwargs: Any) -> Any:
                if not counter.paused:
                    fn = getattr(self, "fn", self)
                    kernels[getattr(fn, "__name__", type(fn).__name__)] += 1
                with counter.pause():
                    return run(*args, **kwargs)

            return launch

        return counted_getitem

    classes = (KernelInterface, InterpretedFunction)
    with patched([(cls, "__getitem__", counted) for cls in classes]):
        yield


def count_launches(llm: LLM, steps: int) -> tuple[list[str], collections.Counter[str]]:
    """Aten op names and Triton launches of ``steps`` engine steps' ``launch`` calls, the graphs'
    uncaptured bodies excluded."""
    engine = llm.engine
    runner = engine.runner
    counter, kernels = OpCounter(), collections.Counter[str]()

    def paused(fn: Any) -> Any:
        def run_paused(*args: Any, **kwargs: Any) -> Any:
            with counter.pause():
                return fn(*args, **kwargs)

        return run_paused

    launch = runner.launch
    ops: list[str] = []

    def counted_launch(*args: Any, **kwargs: Any) -> Any:
        counter.ops = []
        with counter, triton_launches(counter, kernels):
            handle = launch(*args, **kwargs)
        ops.extend(counter.ops)
        return handle

    replacements: list[tuple[Any, str, Any]] = [(runner, "launch", lambda _: counted_launch)]
    if runner.graphs is not None and not runner.graphs.captured:
        replacements.append((runner.graphs, "_replay", paused))
    if runner.sampler_graphs is not None and not runner.sampler_graphs.captured:
        replacements.append((runner.sampler_graphs, "_run_size", paused))
    if engine.device.type != "cuda":  # the fused kernel, as on CUDA (launch's rows are plain)
        replacements.append((model_runner, "sample", lambda fn: functools.partial(fn, use_kernel=True)))
    with patched(replacements):
        for _ in range(steps):
            engine.step()
    return ops, kernels


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rollout bench host_ops")
    p.add_argument("--model", default="tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    add_graph_args(p)
    args = p.parse_args(argv)
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    config = graph_config(args)
    if cpu and (
        os.environ.get("TRITON_INTERPRET") != "1" or not (config.graph_sampling or config.graph_inputs)
    ):
        raise SystemExit(
            "on the CPU: TRITON_INTERPRET=1 (the triton backend under the interpreter) and --graph-sampling "
            "or --graph-inputs (without either there are no decode graphs without CUDA)"
        )
    if cpu:  # the triton backend: decode graphs exist with graph_sampling / graph_inputs only
        import dataclasses

        config = dataclasses.replace(config, attention_backend="triton")
    # on the CPU graphs only up to the largest batch (each size's capture runs under the interpreter)
    scheduler = SchedulerConfig(max_num_seqs=max(args.batches)) if cpu else None
    device = "cpu" if cpu else args.device
    llm = LLM(
        args.model, load_format="dummy", device=device, runner_config=config, scheduler_config=scheduler
    )
    engine = llm.engine
    engine.overlap = True  # the loop of a CUDA engine: in-flight tokens every step
    rng = random.Random(0)
    rows = []
    for batch in args.batches:
        ids = start_decode(llm, batch, args.context, rng)
        ops, kernels = count_launches(llm, args.steps)
        engine.abort(ids)
        per_step = {k: v / args.steps for k, v in kinds(ops).items()}
        work = collections.Counter(op for op in ops if op not in VIEWS and op not in ALLOCATIONS)
        row = dict(
            batch=batch,
            per_step=per_step,
            work_ops=dict(work),
            triton_launches=dict(kernels),
            graphs=engine.runner.graphs is not None,
        )
        rows.append(row)
        n = args.steps
        print(
            f"batch {batch:4}: {per_step['ops']:.1f} aten ops per launch ({per_step['views']:.1f} views,"
            f" {per_step['allocations']:.1f} allocations, {per_step['work']:.1f} device work), "
            f"{sum(kernels.values()) / n:.1f} Triton launches; work: "
            + ", ".join(f"{op} {c / n:.1f}" for op, c in work.most_common())
            + (
                "; Triton: " + ", ".join(f"{k} {c / n:.1f}" for k, c in kernels.most_common())
                if kernels
                else ""
            ),
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_ops.json").write_text(json.dumps(rows, indent=1))
    llm.shutdown()


if __name__ == "__main__":
    main()
