"""Attention kernel microbenchmarks on the GPU (W3 decode attention, W4 prefill attention).

Decode: batch {1, 8, 32, 128, 256} x context {128, 1K, 4K} with Qwen3-0.6B heads (16 q / 8 kv,
head_dim 128, bf16, block 16, shuffled block tables); achieved GB/s = KV bytes read / median time,
against a device-to-device copy measured in the same run (bytes read + written). Also the torch
reference path, and CUDA-graph replays (launch overhead removed). Prefill: 64 x 2048-token prompts
through the extend kernel, TFLOP/s counting the causal half, against torch SDPA on the same
problem laid out densely. ``--sweep`` also times decode config variants on a few shapes.

    python -m rollout.benchmarks.attention_kernels [--sweep] [--out DIR]   (JSON to DIR or $OUT)
    python -m rollout.benchmarks.attention_kernels --ragged   (decode configs on W1-like ragged lengths)
    python -m rollout.benchmarks.attention_kernels --extend [--sweep]   (extend kernel: W4, an 8B-shape
        GQA group of 4, a W1-like admission chunk mix; --sweep: packed and unpacked configs)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from rollout.benchmarks.common import graph_ms
from rollout.kernels.attention_ref import paged_attention_ref
from rollout.kernels.decode_attention import DecodeConfig, decode_attention, default_decode_config
from rollout.kernels.prefill_attention import ExtendConfig, default_extend_config, extend_attention
from rollout.kernels.store_kv import store_kv
from rollout.models.layers.attention import decode_order

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 16
DTYPE = torch.bfloat16
BATCHES, CONTEXTS = (1, 8, 32, 128, 256), (128, 1024, 4096)


def median_ms(fn, rep: int = 200) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_ceiling_gbs() -> float:
    src = torch.randn(1 << 29, device="cuda", dtype=DTYPE)  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def decode_problem(
    batch: int, ctx: int, copies: int = 1, seed: int = 0, lens: list[int] | None = None
) -> dict:
    """One cache holding ``copies`` disjoint instances of the problem (tables[i]: instance i), so
    that back-to-back launches over all of them cannot be served from L2. ``lens``: ragged KV
    lengths (each at most ``ctx``) instead of ``ctx`` for every sequence."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = triton.cdiv(ctx, BLOCK)
    num_blocks = copies * batch * blocks_per_seq
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).int()
    tables = list(perm.view(copies, batch, blocks_per_seq).unbind(0))
    return dict(
        q=torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen),
        k_cache=torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen),
        v_cache=torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen),
        block_tables=tables[0],
        tables=tables,
        seq_lens=torch.tensor(lens or [ctx] * batch, dtype=torch.int32, device="cuda"),
        scale=HEAD_DIM**-0.5,
    )


def graph_ms_per_launch(
    p: dict,
    config: DecodeConfig | None = None,
    order: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> float:
    """Median time of one decode launch per instance, all instances' launches in one graph."""

    def launch(table: torch.Tensor) -> torch.Tensor:
        return decode_attention(
            p["q"],
            p["k_cache"],
            p["v_cache"],
            table,
            p["seq_lens"],
            p["scale"],
            config=config,
            order=order,
            counters=counters,
        )

    return graph_ms(launch, p["tables"])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _args(p: dict) -> tuple:
    """decode_attention's leading arguments for problem ``p``."""
    return (p["q"], p["k_cache"], p["v_cache"], p["block_tables"], p["seq_lens"], p["scale"])


def decode_fn(p: dict, config: DecodeConfig | None = None, order: torch.Tensor | None = None):
    args = _args(p)
    return lambda: decode_attention(*args, config=config, order=order)


def torch_decode_fn(p: dict):
    batch, ctx = p["q"].shape[0], int(p["seq_lens"][0])
    lens, starts = [ctx] * batch, list(range(batch + 1))
    args = (p["q"], p["k_cache"], p["v_cache"], p["block_tables"], p["seq_lens"], lens, starts, p["scale"])
    return lambda: paged_attention_ref(*args)


def bench_decode(ceiling: float, with_torch: bool) -> list[dict]:
    rows = []
    for batch in BATCHES:
        for ctx in CONTEXTS:
            kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2
            p = decode_problem(batch, ctx, copies=min(256, triton.cdiv(256 << 20, kv_bytes)))
            config = default_decode_config(batch, KV_HEADS, p["q"].device)
            fn = decode_fn(p)
            err = rel_err(fn(), torch_decode_fn(p)())
            ms = median_ms(fn)
            in_graph = graph_ms_per_launch(p)
            row = dict(
                batch=batch,
                ctx=ctx,
                splits=config.num_splits,
                use_dot=config.use_dot,
                ms=ms,
                graph_ms=in_graph,
                gbs=kv_bytes / ms / 1e6,
                graph_gbs=kv_bytes / in_graph / 1e6,
                frac_copy=kv_bytes / in_graph / 1e6 / ceiling,
                rel_err_vs_torch=err,
            )
            if with_torch:
                torch_ms = median_ms(torch_decode_fn(p), rep=100)
                row.update(torch_ms=torch_ms, speedup=torch_ms / ms)
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            del p
            torch.cuda.empty_cache()
    return rows


def sweep_decode(ceiling: float) -> list[dict]:
    """Config variants on a few shapes (each checked against the torch path first)."""
    # A first, wider sweep (block_n 16-128, 4/8 warps, 1-3 stages, dot vs reductions) found the
    # dot path 2.4x faster than the reductions and 4 warps >= 8; this is the narrowed one.
    variants = [DecodeConfig(1, bn, True, 4, st) for bn in (64, 128) for st in (2, 3)]
    variants += [DecodeConfig(1, 64, False, 4, 2)]
    rows = []
    for batch, ctx in ((256, 4096), (32, 4096), (8, 4096), (1, 4096)):
        p = decode_problem(batch, ctx)
        ref = torch_decode_fn(p)()
        kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * p["k_cache"].element_size()
        default = default_decode_config(batch, KV_HEADS, p["q"].device)
        splits_options = sorted({default.num_splits} | ({1, 2, 4, 8, 16, 32} if batch <= 32 else {1}))
        for base in variants:
            sweep_splits = base.use_dot and base.num_stages == 2
            for splits in splits_options if sweep_splits else [default.num_splits]:
                cfg = DecodeConfig(splits, base.block_n, base.use_dot, base.num_warps, base.num_stages)
                fn = decode_fn(p, cfg)
                try:
                    err = rel_err(fn(), ref)
                    ms = median_ms(fn, rep=100)
                except Exception as exc:  # a config that fails to compile is a data point, not a crash
                    rows.append(dict(batch=batch, ctx=ctx, config=repr(cfg), error=repr(exc)[:300]))
                    continue
                rows.append(
                    dict(
                        batch=batch,
                        ctx=ctx,
                        config=cfg.__dict__,
                        ms=ms,
                        frac_copy=kv_bytes / ms / 1e6 / ceiling,
                        err=err,
                    )
                )
        best = sorted(
            (r for r in rows if r.get("batch") == batch and r.get("ctx") == ctx and "ms" in r),
            key=lambda r: r["ms"],
        )
        for r in best[:5]:
            print(
                "sweep",
                batch,
                ctx,
                r["config"],
                f"{r['ms']:.4f} ms {r['frac_copy']:.3f} err {r['err']:.1e}",
                flush=True,
            )
        del p, ref
        torch.cuda.empty_cache()
    return rows


def bench_merge() -> list[dict]:
    """Split decode at small batches, the merge kernel vs the in-kernel merge (``counters``): per
    launch in a graph, the way the decode graphs run them (one launch per layer)."""
    rows = []
    for batch in (1, 2, 4, 8, 16, 32):
        for ctx in (1024, 4096):
            kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2
            p = decode_problem(batch, ctx, copies=min(64, triton.cdiv(256 << 20, kv_bytes)))
            config = default_decode_config(batch, KV_HEADS, p["q"].device)
            counters = torch.zeros(batch * KV_HEADS, dtype=torch.int32, device="cuda")
            plain = decode_fn(p)()
            fused = decode_attention(*_args(p), config=config, counters=counters)
            row = dict(
                batch=batch,
                ctx=ctx,
                splits=config.num_splits,
                merge_kernel_us=1e3 * graph_ms_per_launch(p),
                fused_merge_us=1e3 * graph_ms_per_launch(p, counters=counters),
                rel_err=rel_err(fused, plain),
                counters_zero=not bool(counters.any()),
            )
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return rows


def sweep_ragged(ceiling: float, seed: int = 3) -> list[dict]:
    """W1's decode phase: mid-size batches whose KV lengths spread over 200-2000 tokens. Splits x
    tile x stages in CUDA graphs over disjoint copies; % of copy from the KV bytes actually read."""
    rng = random.Random(seed)
    rows = []
    for batch in (32, 64, 96, 128, 192, 256):
        lens = [rng.randint(200, 2000) for _ in range(batch)]
        kv_bytes = 2 * sum(lens) * KV_HEADS * HEAD_DIM * 2
        p = decode_problem(batch, 2000, copies=min(64, triton.cdiv(256 << 20, kv_bytes)), lens=lens)
        ref = paged_attention_ref(
            p["q"], p["k_cache"], p["v_cache"], p["block_tables"], p["seq_lens"], lens,
            list(range(batch + 1)), p["scale"],
        )  # fmt: skip
        default = default_decode_config(batch, KV_HEADS, p["q"].device)
        grid = [(splits, bn, st) for splits in (1, 2, 3, 4) for bn in (64, 128) for st in (2, 3)]
        configs = [None] + [DecodeConfig(splits, bn, True, 4, st) for splits, bn, st in grid]
        longest_first = torch.from_numpy(decode_order(np.array(lens))).int().cuda()
        for cfg in configs:
            for order in (None, longest_first):
                try:
                    err = rel_err(decode_fn(p, cfg, order)(), ref)
                    ms = graph_ms_per_launch(p, cfg, order)
                except Exception as exc:  # a config that fails to compile is a data point, not a crash
                    rows.append(dict(batch=batch, config=repr(cfg), error=repr(exc)[:300]))
                    continue
                rows.append(
                    dict(
                        batch=batch,
                        config=(cfg or default).__dict__,
                        default=cfg is None,
                        longest_first=order is not None,
                        graph_ms=ms,
                        frac_copy=kv_bytes / ms / 1e6 / ceiling,
                        err=err,
                    )
                )
        for ordered in (False, True):
            mine = [r for r in rows if r.get("batch") == batch and r.get("longest_first") == ordered]
            best = min(mine, key=lambda r: r["graph_ms"])
            dflt = next(r for r in mine if r["default"])
            name = f"ragged batch {batch}{' longest-first' if ordered else ''}"
            d_us, b_us = dflt["graph_ms"] * 1e3, best["graph_ms"] * 1e3
            print(
                f"{name}: default {dflt['config']} {d_us:.1f} us ({100 * dflt['frac_copy']:.1f}% copy);"
                f" best {best['config']} {b_us:.1f} us ({100 * best['frac_copy']:.1f}%)",
                flush=True,
            )
        del p, ref
        torch.cuda.empty_cache()
    return rows


def extend_problem(lens: list[int], heads: int, seed: int = 1) -> dict:
    """Prompts of ``lens`` tokens each, prefilled at once (no prefix), ``heads`` query heads over
    KV_HEADS KV heads."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = triton.cdiv(max(lens), BLOCK)
    num_blocks = len(lens) * blocks_per_seq
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    return dict(
        q=torch.randn(starts[-1], heads, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen),
        k_cache=torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen),
        v_cache=torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen),
        block_tables=torch.randperm(num_blocks, device="cuda", generator=gen).int().view(len(lens), -1),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        max_query_len=max(lens),
        scale=HEAD_DIM**-0.5,
    )


def sdpa_dense(p: dict, num_seqs: int, q_len: int, heads: int) -> tuple[torch.Tensor, float]:
    """torch SDPA (flash) on the same uniform problem with K/V gathered contiguously, as [B, H, L, D]:
    its output [T, H, D] and median ms."""
    kv_order = p["block_tables"].long().view(-1)
    k = p["k_cache"][kv_order].view(num_seqs, q_len, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = p["v_cache"][kv_order].view(num_seqs, q_len, KV_HEADS, HEAD_DIM).transpose(1, 2)
    k, v = (t.repeat_interleave(heads // KV_HEADS, 1).contiguous() for t in (k, v))
    qd = p["q"].view(num_seqs, q_len, heads, HEAD_DIM).transpose(1, 2).contiguous()
    out = F.scaled_dot_product_attention(qd, k, v, is_causal=True, scale=p["scale"])
    ms = median_ms(lambda: F.scaled_dot_product_attention(qd, k, v, is_causal=True, scale=p["scale"]))
    return out.transpose(1, 2).reshape(-1, heads, HEAD_DIM), ms


def random_lens(n: int, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


# (name, prompt lengths, query heads): W4's prefill, the same with an 8B-shape GQA group of 4, and
# W1's admission steps (prompts of 100-1024 tokens, ~8K tokens a step)
EXTEND_SHAPES = (
    ("64x2048", [2048] * 64, HEADS),
    ("64x2048 group4", [2048] * 64, 32),
    ("w1 chunk", random_lens(14, 100, 1024, seed=5), HEADS),
)


def bench_extend(sweep: bool, shapes=EXTEND_SHAPES[:1]) -> list[dict]:
    rows = []
    for shape_name, lens, heads in shapes:
        p = extend_problem(lens, heads)
        flops = sum(4 * heads * HEAD_DIM * n * (n + 1) / 2 for n in lens)  # causal half
        args = [p[k] for k in ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "query_start_loc")]
        args += [p["max_query_len"], p["scale"]]
        if len(set(lens)) == 1:
            want, sdpa_ms = sdpa_dense(p, len(lens), lens[0], heads)
            rows.append(
                dict(shape=shape_name, name="torch_sdpa_dense", ms=sdpa_ms, tflops=flops / sdpa_ms / 1e9)
            )
        else:  # varlen: the default config (tested against the reference) is the yardstick
            want = extend_attention(*args)
        configs = [None]
        if sweep:
            # narrowed from an 18-config sweep (64/128 x 32/64 x 4/8 warps x 2/3 stages)
            configs += [
                ExtendConfig(128, 32, 4, 3),
                ExtendConfig(64, 64, 4, 3),
                ExtendConfig(128, 64, 8, 3),
                # pack_gqa: the tile holds block_m // group positions of each head of a GQA group
                ExtendConfig(128, 32, 4, 3, pack_gqa=True),
                ExtendConfig(128, 32, 8, 3, pack_gqa=True),  # no register spills (4 warps: 40 B)
                ExtendConfig(128, 64, 4, 3, pack_gqa=True),
                ExtendConfig(256, 32, 8, 3, pack_gqa=True),
                ExtendConfig(256, 64, 8, 3, pack_gqa=True),
                ExtendConfig(256, 64, 8, 2, pack_gqa=True),
                ExtendConfig(256, 128, 8, 2, pack_gqa=True),
            ]
        for cfg in configs:
            name = repr(cfg or default_extend_config(p["max_query_len"], HEAD_DIM, heads // KV_HEADS)) + (
                " (default)" if cfg is None else ""
            )
            try:
                err = rel_err(extend_attention(*args, config=cfg), want)
                ms = median_ms(lambda cfg=cfg, args=args: extend_attention(*args, config=cfg), rep=100)
            except Exception as exc:
                rows.append(dict(shape=shape_name, name=name, error=repr(exc)[:300]))
                continue
            rows.append(dict(shape=shape_name, name=name, ms=ms, tflops=flops / ms / 1e9, err=err))
            print(rows[-1], flush=True)
        del p, want
        torch.cuda.empty_cache()
    return rows


def bench_store_kv(ceiling: float) -> list[dict]:
    rows = []
    for num_tokens in (256, 131072):
        gen = torch.Generator(device="cuda").manual_seed(2)
        num_blocks = max(triton.cdiv(num_tokens, BLOCK) * 2, 1024)
        k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        v_cache = torch.zeros_like(k_cache)
        qkv = torch.randn(
            num_tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen
        )
        key, value = qkv[:, HEADS : HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS :]
        slots = torch.randperm(num_blocks * BLOCK, device="cuda", generator=gen)[:num_tokens]
        args = (key, value, k_cache, v_cache, slots)
        ms = median_ms(lambda args=args: store_kv(*args))
        nbytes = 2 * 2 * num_tokens * KV_HEADS * HEAD_DIM * 2  # K and V, read + write
        rows.append(
            dict(num_tokens=num_tokens, ms=ms, gbs=nbytes / ms / 1e6, frac_copy=nbytes / ms / 1e6 / ceiling)
        )
        print("store_kv", rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time kernel config variants")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch reference timings")
    parser.add_argument(
        "--ragged", action="store_true", help="only the ragged-length decode sweep (W1's decode phase)"
    )
    parser.add_argument("--extend", action="store_true", help="only the extend (prefill) kernel timings")
    parser.add_argument(
        "--merge", action="store_true", help="only split decode's merge kernel vs the in-kernel merge"
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    result: dict = dict(
        device=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__
    )
    ceiling = copy_ceiling_gbs()
    result["copy_gbs"] = ceiling
    print(f"{props.name}: copy {ceiling:.0f} GB/s (read + write)", flush=True)
    if args.ragged:
        result["decode_ragged"] = sweep_ragged(ceiling)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "attention_ragged.json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    if args.merge:
        result["decode_merge"] = bench_merge()
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "attention_merge.json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    if args.extend:
        result["extend"] = bench_extend(args.sweep, EXTEND_SHAPES)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "attention_extend.json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    result["store_kv"] = bench_store_kv(ceiling)
    if args.sweep:
        result["decode_sweep"] = sweep_decode(ceiling)
    result["extend"] = bench_extend(sweep=False)  # the extend configs: --extend --sweep
    result["decode"] = bench_decode(ceiling, not args.no_torch)
    result["seconds"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention_kernels.json"), "w") as f:
        json.dump(result, f, indent=1)

    print(f"\ncopy ceiling {ceiling:.0f} GB/s; decode GB/s = KV bytes / median time (eager | CUDA graph)")
    print(
        f"{'batch':>5} {'ctx':>5} {'split':>5} {'ms':>8} {'graph ms':>8} {'GB/s':>6} {'% copy':>6}"
        f" {'torch ms':>9}"
    )
    for r in result["decode"]:
        torch_ms = f"{r['torch_ms']:9.3f}" if "torch_ms" in r else f"{'-':>9}"
        print(
            f"{r['batch']:5d} {r['ctx']:5d} {r['splits']:5d} {r['ms']:8.4f} {r['graph_ms']:8.4f} "
            f"{r['graph_gbs']:6.0f} {100 * r['frac_copy']:6.1f} {torch_ms}"
        )
    for r in result["extend"]:
        if "ms" in r and (r["name"].endswith("(default)") or r["name"].startswith("torch")):
            print(f"extend {r['shape']} {r['name']}: {r['ms']:.3f} ms, {r['tflops']:.0f} TFLOP/s")
    print(f"total {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
