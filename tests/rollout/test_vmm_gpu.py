"""rollout.vmm on the GPU (device machine): an address range whose physical memory goes and comes
back while tensors and a captured CUDA graph over it stay valid."""

from __future__ import annotations

import gc

import pytest
import torch

from rollout.vmm import VirtualMemory

pytestmark = pytest.mark.gpu


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def test_release_and_restore_keep_the_address_and_the_graph():
    mem = VirtualMemory(256 << 20, "cuda")
    t = mem.tensor().view(torch.float32)
    assert t.data_ptr() == mem.address and mem.mapped and mem.nbytes == 256 << 20
    w = torch.full_like(t, 2.0)
    t.fill_(1.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        t.mul_(w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        t.mul_(w)
    graph.replay()
    assert (t == 4.0).all()
    before = free_bytes()
    mem.release()
    mem.release()  # twice: no-op
    assert not mem.mapped and free_bytes() - before >= mem.nbytes
    mem.restore()
    assert mem.mapped and before - free_bytes() < (2 << 20)  # taken back, at the same address
    t.fill_(3.0)
    graph.replay()
    assert (t == 6.0).all() and t.data_ptr() == mem.address


def test_tensors_keep_the_range_alive_and_the_last_one_frees_it():
    before = free_bytes()
    mem = VirtualMemory(64 << 20, "cuda")
    t = mem.tensor()[: 1 << 20]
    del mem
    gc.collect()
    t.fill_(7)  # still mapped: the tensor holds the range
    assert int(t[-1]) == 7
    assert before - free_bytes() >= 64 << 20
    del t
    gc.collect()
    assert before - free_bytes() < (2 << 20)
