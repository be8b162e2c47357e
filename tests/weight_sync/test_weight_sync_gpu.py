"""Weight sync on the GPU: CUDA IPC from this process into an engine core process on the same GPU,
NCCL into an engine on a second GPU, and sleep/wake with the memory it releases (device only)."""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, CacheConfig, RunnerConfig, SamplingParams
from rollout.weight_sync import WeightSender
from tests.weight_sync.helpers import PROMPTS, assert_same, checkpoints, fingerprint  # noqa: F401

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=0)
CACHE = CacheConfig(num_blocks=256)
KW = dict(dtype="bfloat16", cache_config=CACHE)


def reference(path: str, device: str = "cuda:0"):
    with LLM(path, multiprocess=True, device=device, **KW) as llm:
        return fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


def test_cuda_ipc_from_another_process_equals_fresh_engine(checkpoints):  # noqa: F811
    expected = reference(checkpoints["new_dir"])
    trainer = checkpoints["new_model"].to("cuda:0")  # fp32 master weights; the sender casts to bf16
    try:
        with LLM(checkpoints["old"], multiprocess=True, device="cuda:0", **KW) as llm:
            sender = WeightSender(llm, bucket_bytes=64 << 10)  # many buckets: exercises buffer reuse
            bad = [(n, p[..., :-1] if "layers.1.mlp.up" in n else p) for n, p in trainer.named_parameters()]
            with pytest.raises(ValueError, match="shape mismatch"):
                sender.push(bad)
            assert sender.push(trainer) == 1 and sender.last_transport == "cuda_ipc"
            assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), expected, atol=0)
            assert sender.push(trainer.named_parameters(), version=4) == 4  # buffers reused
            sender.close()
    finally:
        checkpoints["new_model"].to("cpu")


def test_a_malformed_ipc_handle_is_refused_and_the_engine_serves(checkpoints):  # noqa: F811
    # _new_shared_cuda's RuntimeError escaped the control plane and killed the core (audit, stop 26)
    from rollout.weight_sync.cuda_ipc import device_uuid, share
    from rollout.weight_sync.manifest import plan_buckets

    model = checkpoints["new_model"]
    manifest = plan_buckets([(n, tuple(p.shape), torch.bfloat16) for n, p in model.named_parameters()])
    buffer = torch.empty(max(manifest.bucket_sizes), dtype=torch.uint8, device="cuda:0")
    bad = {**share(buffer), "handle": b"\x00" * 64}
    assert bad["uuid"] == device_uuid(torch.device("cuda:0"))
    with LLM(checkpoints["old"], multiprocess=True, device="cuda:0", **KW) as llm:
        with pytest.raises(ValueError, match="cannot open the shared CUDA buffer"):
            llm.client.call("begin_weight_update", manifest=manifest.to_wire(), buffers=[bad])
        state = llm.client.call("get_state")
        assert state["state"] == "running" and state["weight_version"] == 0
        assert llm.generate(PROMPTS, GREEDY, use_tqdm=False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_from_gpu0_to_engine_on_gpu1(checkpoints):  # noqa: F811
    expected = reference(checkpoints["new_dir"], "cuda:1")
    trainer = checkpoints["new_model"].to("cuda:0")
    try:
        with LLM(checkpoints["old"], multiprocess=True, device="cuda:1", **KW) as llm:
            sender = WeightSender(llm, bucket_bytes=64 << 10)
            assert sender.push(trainer) == 1 and sender.last_transport == "nccl"
            assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), expected, atol=0)
            assert sender.push(trainer, version=2) == 2
            sender.close()
    finally:
        checkpoints["new_model"].to("cpu")


def test_sleep_releases_memory_and_wake_keeps_outputs_and_graphs(checkpoints):  # noqa: F811
    llm = LLM(
        checkpoints["old"],
        device="cuda:0",
        dtype="bfloat16",
        cache_config=CacheConfig(num_blocks=4096),
        # graphs freed at sleep and captured again at wake (mixed graphs too)
        runner_config=RunnerConfig(max_mixed_graph_tokens=512, sleep_keeps_graphs=False),
    )
    before = fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    runner = llm.engine.runner
    kv_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
    info = llm.sleep(1)
    assert info["freed_bytes"] >= 0.9 * kv_bytes  # measured with mem_get_info
    assert runner.graphs is None and runner.mixed is None and runner.kv_cache is None
    wake = llm.wake_up()
    assert wake["recaptured"] == (runner.runner_config.cuda_graphs and runner.attention_backend == "triton")
    assert (runner.mixed is not None) == wake["recaptured"]
    assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), before, atol=0)
    llm.sleep(2)
    llm.wake_up(["weights"])
    llm.update_weights_from_disk(checkpoints["old"])
    llm.wake_up(["kv_cache"])
    assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), before, atol=0)


def test_sleep_that_keeps_graphs_releases_memory_and_keeps_outputs(checkpoints):  # noqa: F811
    """RunnerConfig(sleep_keeps_graphs=True): the same graphs (not captured again) give the same
    outputs after a level-1 wake, and a fresh engine's after a level-2 wake and an update."""
    kw = dict(
        device="cuda:0",
        dtype="bfloat16",
        cache_config=CacheConfig(num_blocks=4096),
        runner_config=RunnerConfig(max_mixed_graph_tokens=512, sleep_keeps_graphs=True),
    )
    fresh = LLM(checkpoints["new_dir"], **kw)
    expected = fingerprint(fresh.generate(PROMPTS, GREEDY, use_tqdm=False))
    del fresh
    llm = LLM(checkpoints["old"], **kw)
    before = fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    runner = llm.engine.runner
    graphs, mixed, kv_ptr = runner.graphs, runner.mixed, runner.kv_cache.data_ptr()
    weight_ptrs = {n: p.data_ptr() for n, p in runner.model.named_parameters()}
    assert graphs is not None and mixed is not None
    assert runner.weight_memory is not None and runner.kv_memory is not None
    kv_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
    info = llm.sleep(1)
    assert info["freed_bytes"] >= 0.9 * (kv_bytes + runner.weight_bytes)  # measured with mem_get_info
    assert not runner.kv_memory.mapped and not runner.weight_memory.mapped
    wake = llm.wake_up()
    assert wake["recaptured"] is False and wake["taken_bytes"] >= 0.9 * (kv_bytes + runner.weight_bytes)
    assert runner.graphs is graphs and runner.mixed is mixed and runner.kv_cache.data_ptr() == kv_ptr
    assert {n: p.data_ptr() for n, p in runner.model.named_parameters()} == weight_ptrs
    assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), before, atol=0)
    llm.sleep(2)
    llm.wake_up(["weights"])
    llm.update_weights_from_disk(checkpoints["new_dir"])
    llm.wake_up(["kv_cache"])
    assert runner.graphs is graphs
    assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), expected, atol=0)


def test_an_ipc_update_abandoned_after_a_bucket_expires_and_a_full_push_repairs_it(checkpoints):  # noqa: F811
    """A sender gone silent after writing one CUDA IPC bucket: the lease ends the update, the engine
    (weights half old, half new) holds requests until a complete update, which then serves as a
    fresh engine on the new weights."""
    import time

    from rollout.messages import AddRequest
    from rollout.weight_sync.cuda_ipc import share
    from rollout.weight_sync.manifest import pack, plan_buckets

    expected = reference(checkpoints["new_dir"])
    trainer = checkpoints["new_model"].to("cuda:0")
    try:
        params = [(n, p.to(torch.bfloat16)) for n, p in trainer.named_parameters()]
        manifest = plan_buckets([(n, tuple(p.shape), p.dtype) for n, p in params], 64 << 10)
        assert manifest.num_buckets > 2
        buffer = torch.empty(max(manifest.bucket_sizes), dtype=torch.uint8, device="cuda:0")
        with LLM(checkpoints["old"], multiprocess=True, device="cuda:0", **KW) as llm:
            wire = manifest.to_wire()
            llm.client.call("begin_weight_update", manifest=wire, buffers=[share(buffer)], lease_s=1.0)
            entries = manifest.bucket_entries(0)
            pack((t for _, t in params[: len(entries)]), entries, buffer)
            torch.cuda.synchronize()
            assert llm.client.call("weight_bucket", index=0) == 0
            llm.client.send(AddRequest("held", PROMPTS[0], None, GREEDY.to_dict()))
            time.sleep(2.0)
            state = llm.client.call("get_state")
            assert state["num_expired_updates"] == 1 and state["state"] == "updating_weights"
            assert not state["weights_valid"] and state["num_requests"] == 0  # held, not running
            with pytest.raises(ValueError, match="no weight update in progress"):
                llm.client.call("weight_bucket", index=1)
            with WeightSender(llm) as repair:
                assert repair.push(trainer) == 1  # the repair
            # push's last wait_call drops the non-ack frames it drains, and the core sends its ack in
            # one batch with the held request's first step: read up to the finish, compare the tail
            tokens: list[int] = []
            finished = False
            deadline = time.monotonic() + 60
            while not finished and time.monotonic() < deadline:
                for msg in llm.client.recv(1.0):
                    for d in msg.deltas:
                        if d.request_id == "held":
                            tokens += [t for s in d.samples for t in s.token_ids]
                            finished |= any(s.finish_reason for s in d.samples)
                    tokens += [
                        t
                        for rid, t in zip(msg.tokens.request_ids, msg.tokens.token_ids, strict=True)
                        if rid == "held"
                    ]
            want = expected[0][0]
            assert finished and tokens and tokens == want[len(want) - len(tokens) :]
            assert_same(fingerprint(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), expected, atol=0)
    finally:
        checkpoints["new_model"].to("cpu")
