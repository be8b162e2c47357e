"""W6 of BENCHMARKS.md: full weight updates, against the copy floor (same GPU) or a raw broadcast of
the same bytes (across GPUs); sleep/wake times and memory released; and a check that an updated
engine equals a fresh one loaded with the new weights.

    rollout bench weight_sync --model qwen3-0.6b --check-disk --out DIR   # 1 GPU
    rollout bench weight_sync --model qwen3-0.6b --nccl --out DIR         # 2 GPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from rollout.benchmarks.common import add_graph_args, graph_config
from rollout.presets import resolve_model
from rollout.weight_sync import WeightSender
from rollout.weight_sync.process_group import WeightGroup

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = [[11, 22, 33, 44, 55, 66, 77, 88], [1000, 2000, 3000]]


def trainer_weights(path: str, device: str, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Random bf16 tensors with the HF names and shapes of the model at ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for name, p in meta.named_parameters():
        t = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
        t.uniform_(-0.02, 0.02, generator=gen) if "norm" not in name else t.fill_(1.0)
        out.append((name, t))
    return out


def timed(fn, reps: int = 3) -> tuple[float, object]:
    """Best wall time over ``reps`` (after one warm-up), in ms, and the last result."""
    result = fn()
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best, result


def copy_floor_ms(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = timed(lambda: dst.copy_(src), reps=5)
    torch.cuda.empty_cache()
    return ms


def run_single_gpu(args: argparse.Namespace, path: str, kw: dict) -> dict:
    res: dict = {}
    weights = trainer_weights(path, "cuda:0", seed=1)
    nbytes = sum(t.numel() * t.element_size() for _, t in weights)
    res["bytes"] = nbytes
    res["copy_floor_ms"] = copy_floor_ms(nbytes)
    torch.cuda.empty_cache()
    print(f"{args.model}: {nbytes / 1e9:.2f} GB, copy floor {res['copy_floor_ms']:.2f} ms", flush=True)

    llm = LLM(path, load_format="dummy", **kw)
    res["same_process_ms"], _ = timed(lambda: llm.update_weights(weights))
    print(f"same process: {res['same_process_ms']:.2f} ms", flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    with LLM(path, load_format="dummy", multiprocess=True, **kw) as llm:
        sender = WeightSender(llm, bucket_bytes=args.bucket_mb << 20)
        res["ipc_ms"], _ = timed(lambda: sender.push(weights))
        assert sender.last_transport == "cuda_ipc", sender.last_transport
        print(f"CUDA IPC push: {res['ipc_ms']:.2f} ms ({nbytes / res['ipc_ms'] / 1e6:.0f} GB/s)", flush=True)
        if args.profile:  # where one push's time goes, on the trainer side (waits are the engine's share)
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(sender.push, weights)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        ipc_out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        sender.close()
        for level in (1, 2):
            t0 = time.perf_counter()
            info = llm.sleep(level)
            sleep_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            if level == 2:
                llm.wake_up(["weights"])
                WeightSender(llm).push(weights)
                wake = llm.wake_up(["kv_cache"])
            else:
                wake = llm.wake_up()
            wake_ms = (time.perf_counter() - t0) * 1e3
            after = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
            res[f"sleep{level}"] = dict(
                sleep_ms=sleep_ms,
                wake_ms=wake_ms,  # level 2: wake weights + re-send them + wake the KV cache
                freed_gb=info["freed_bytes"] / 1e9,
                recaptured=wake["recaptured"],  # the CUDA graphs captured again at wake-up
                outputs_same=after == ipc_out,
            )
            print(f"sleep({level}): {res[f'sleep{level}']}", flush=True)

    if args.check_disk:
        d = Path(args.tmp) / "new_weights"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        shutil.copy(Path(path) / "config.json", d / "config.json")
        save_file({n: t.contiguous() for n, t in weights}, str(d / "model.safetensors"))
        with LLM(str(d), multiprocess=True, **kw) as fresh:
            fresh_out = [o.outputs[0].token_ids for o in fresh.generate(PROMPTS, GREEDY, use_tqdm=False)]
            t0 = time.perf_counter()
            fresh.update_weights_from_disk(str(d))
            res["disk_ms"] = (time.perf_counter() - t0) * 1e3
        res["ipc_equals_fresh_engine"] = fresh_out == ipc_out
        print(f"disk reload: {res['disk_ms']:.0f} ms; IPC-updated == fresh engine: {fresh_out == ipc_out}")
    return res


def _raw_receiver(port: int, nbytes: int, reps: int) -> None:
    torch.cuda.set_device(1)  # as the engine does: NCCL and torch.cuda.synchronize() act on cuda:1
    group = WeightGroup("127.0.0.1", port, 1, 2, "nccl", torch.device("cuda:1"))
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    for _ in range(reps + 1):
        group._broadcast(buf).wait()
        torch.cuda.synchronize()
    group.close()


def run_nccl(args: argparse.Namespace, path: str, kw: dict) -> dict:
    res: dict = {}
    weights = trainer_weights(path, "cuda:0", seed=1)
    nbytes = sum(t.numel() * t.element_size() for _, t in weights)
    torch.cuda.set_device(0)
    store = WeightGroup.host_store("127.0.0.1", 0, 2)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_raw_receiver, args=(store.port, nbytes, 3))
    proc.start()
    group = WeightGroup("127.0.0.1", store.port, 0, 2, "nccl", torch.device("cuda:0"), store=store)
    flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    res["raw_broadcast_ms"], _ = timed(lambda: group._broadcast(flat).wait())
    # Leave before joining: with the join first, the receiver never exited (its NCCL shutdown is
    # taken to wait for this rank's; joining first hung at stop 9 and at the first try of stop 14).
    group.close()
    proc.join(timeout=120)
    if proc.exitcode != 0:
        proc.kill()
        raise RuntimeError(
            f"raw broadcast receiver ended with {proc.exitcode} (None: still running after 120 s)"
        )
    print(f"raw NCCL broadcast of {nbytes / 1e9:.2f} GB: {res['raw_broadcast_ms']:.2f} ms", flush=True)
    kw = {**kw, "device": "cuda:1"}
    with LLM(path, load_format="dummy", multiprocess=True, **kw) as llm:
        sender = WeightSender(llm, bucket_bytes=args.bucket_mb << 20)
        res["nccl_push_ms"], _ = timed(lambda: sender.push(weights))
        assert sender.last_transport == "nccl", sender.last_transport
        sender.close()
    res["nccl_vs_raw"] = res["raw_broadcast_ms"] / res["nccl_push_ms"]
    print(f"NCCL push: {res['nccl_push_ms']:.2f} ms = {100 * res['nccl_vs_raw']:.0f}% of raw broadcast")
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rollout bench weight_sync", description=__doc__)
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--nccl", action="store_true", help="2 GPUs: trainer on cuda:0, engine on cuda:1")
    parser.add_argument("--check-disk", action="store_true", help="disk reload + fresh-engine equality")
    parser.add_argument("--profile", action="store_true", help="cProfile one CUDA IPC push (trainer side)")
    parser.add_argument(
        "--num-blocks", type=int, default=2048, help="KV blocks per engine (fixed: two engines share the GPU)"
    )
    parser.add_argument(
        "--sleep-keeps-graphs",
        action=argparse.BooleanOptionalAction,
        default=RunnerConfig().sleep_keeps_graphs,
        help="RunnerConfig.sleep_keeps_graphs (VMM sleep; --no-sleep-keeps-graphs: captured again at wake)",
    )
    add_graph_args(parser)
    parser.add_argument("--tmp", default="/tmp/rollout-w6")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    path, _ = resolve_model(args.model, "dummy")
    runner = dataclasses.replace(graph_config(args), sleep_keeps_graphs=args.sleep_keeps_graphs)
    kw = dict(dtype="bfloat16", cache_config=CacheConfig(num_blocks=args.num_blocks), runner_config=runner)
    res = run_nccl(args, path, kw) if args.nccl else run_single_gpu(args, path, kw)
    res.update(model=args.model, bucket_mb=args.bucket_mb, device=torch.cuda.get_device_name())
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"w6_{args.model}{'_nccl' if args.nccl else ''}.json"
        Path(args.out, name).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
