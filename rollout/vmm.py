"""Device memory whose virtual addresses outlive its physical memory (CUDA virtual memory
management, called through the driver API with ctypes).

A sleep that frees the KV cache and the weights through the caching allocator gives their
addresses away, so every CUDA graph that reads them must be captured again at wake-up (0.93 s of a
6.45 s colocated GRPO step on the H200, with the decode and piecewise graphs). Memory mapped here
keeps its address range reserved while the physical pages go back to the driver: a wake maps new
pages at the same addresses and the graphs replay as they are.

The driver calls are plain ctypes calls on the thread that uses torch's primary context (set up by
the first CUDA tensor op), the setting that `scratch/vmm_probe.py` checked on the H200 (1 GiB:
unmap + release 0.7 ms, create + map 0.2 ms; a graph captured before the release replayed
correctly after the remap). vLLM (a C extension) and SGLang (a preloaded C library) do the same
with compiled code.
"""

from __future__ import annotations

import ctypes

import torch

_LOCATION_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_ALLOCATION_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_ACCESS_READ_WRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class VirtualMemory:
    """``nbytes`` of device memory (rounded up to the driver's granularity, 2 MiB on Hopper) at a
    virtual address that stays reserved until this object is gone. ``release`` gives the physical
    memory back, ``restore`` maps new physical memory at the same address (contents undefined).

    ``tensor()`` views the range as uint8; each view keeps this object alive, so the range is freed
    only once no tensor over it is left."""

    def __init__(self, nbytes: int, device: torch.device | str) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"VirtualMemory needs a CUDA device, got {device}")
        if nbytes < 1:
            raise ValueError(f"VirtualMemory needs nbytes >= 1, got {nbytes}")
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.synchronize(self.device_index)  # the device's primary context exists
        self._cuda = ctypes.CDLL("libcuda.so.1")
        self._prop = _AllocationProp(
            type=_ALLOCATION_PINNED, location=_Location(_LOCATION_DEVICE, self.device_index)
        )
        with torch.cuda.device(self.device_index):  # its context current on this thread
            self._reserve(nbytes)

    def _reserve(self, nbytes: int) -> None:
        granularity = ctypes.c_size_t()
        self._check(
            self._cuda.cuMemGetAllocationGranularity(
                ctypes.byref(granularity),
                ctypes.byref(self._prop),
                0,  # the minimum granularity
            ),
            "cuMemGetAllocationGranularity",
        )
        self.nbytes = -(-nbytes // granularity.value) * granularity.value
        self._ptr = ctypes.c_uint64()
        self._check(
            self._cuda.cuMemAddressReserve(
                ctypes.byref(self._ptr),
                ctypes.c_size_t(self.nbytes),
                ctypes.c_size_t(0),
                ctypes.c_uint64(0),
                ctypes.c_uint64(0),
            ),
            "cuMemAddressReserve",
        )
        self._handle: ctypes.c_uint64 | None = None
        try:
            self.restore()
        except Exception:
            self._cuda.cuMemAddressFree(self._ptr, ctypes.c_size_t(self.nbytes))
            self._ptr = ctypes.c_uint64(0)
            raise

    @property
    def address(self) -> int:
        return self._ptr.value

    @property
    def mapped(self) -> bool:
        """Whether physical memory backs the range now."""
        return self._handle is not None

    def restore(self) -> None:
        """Map new physical memory at the reserved range (no-op when mapped); contents undefined."""
        if self._handle is not None:
            return
        with torch.cuda.device(self.device_index):
            self._map()

    def _map(self) -> None:
        handle = ctypes.c_uint64()
        size = ctypes.c_size_t(self.nbytes)
        self._check(
            self._cuda.cuMemCreate(ctypes.byref(handle), size, ctypes.byref(self._prop), ctypes.c_uint64(0)),
            "cuMemCreate (out of device memory?)",
        )
        try:
            self._check(
                self._cuda.cuMemMap(self._ptr, size, ctypes.c_size_t(0), handle, ctypes.c_uint64(0)),
                "cuMemMap",
            )
            access = _AccessDesc(_Location(_LOCATION_DEVICE, self.device_index), _ACCESS_READ_WRITE)
            rc = self._cuda.cuMemSetAccess(self._ptr, size, ctypes.byref(access), ctypes.c_size_t(1))
            if rc != 0:
                self._cuda.cuMemUnmap(self._ptr, size)
                self._check(rc, "cuMemSetAccess")
        except Exception:
            self._cuda.cuMemRelease(handle)
            raise
        self._handle = handle

    def release(self) -> None:
        """Give the physical memory back to the driver, keeping the address range (no-op when
        released). Nothing may use the range until ``restore``: callers synchronize first."""
        if self._handle is None:
            return
        with torch.cuda.device(self.device_index):
            self._check(self._cuda.cuMemUnmap(self._ptr, ctypes.c_size_t(self.nbytes)), "cuMemUnmap")
            self._check(self._cuda.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None

    def tensor(self) -> torch.Tensor:
        """The whole range as a uint8 tensor on the device (it keeps this object alive)."""
        return torch.as_tensor(self, device=torch.device("cuda", self.device_index))

    @property
    def __cuda_array_interface__(self) -> dict:
        return {
            "shape": (self.nbytes,),
            "typestr": "|u1",
            "data": (self.address, False),
            "strides": None,
            "version": 3,
        }

    def __del__(self) -> None:
        cuda = getattr(self, "_cuda", None)
        if cuda is None or not getattr(self, "_ptr", None) or not self._ptr.value:
            return
        try:  # (at interpreter exit the driver may be gone already: nothing to do then)
            torch.cuda.synchronize(self.device_index)
            self.release()
            with torch.cuda.device(self.device_index):
                cuda.cuMemAddressFree(self._ptr, ctypes.c_size_t(self.nbytes))
        except Exception:
            pass

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self._cuda.cuGetErrorName(rc, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: CUDA driver error {rc} ({(name.value or b'?').decode()})")


def parameter_layout(params: dict[str, torch.nn.Parameter], align: int = 256) -> tuple[dict[str, int], int]:
    """Byte offset of each parameter in one flat buffer (each ``align``-byte aligned, in order) and
    the buffer's size."""
    offsets, end = {}, 0
    for name, p in params.items():
        offsets[name] = end
        end += -(-p.numel() * p.element_size() // align) * align
    return offsets, end


def parameter_views(
    params: dict[str, torch.nn.Parameter], offsets: dict[str, int], flat: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each parameter's slice of ``flat`` (uint8, laid out by ``parameter_layout``), viewed with the
    parameter's dtype and shape."""
    views = {}
    for name, p in params.items():
        nbytes = p.numel() * p.element_size()
        views[name] = flat[offsets[name] : offsets[name] + nbytes].view(p.dtype).view(p.shape)
    return views


@torch.no_grad()
def pack_parameters(
    params: dict[str, torch.nn.Parameter], offsets: dict[str, int], flat: torch.Tensor
) -> None:
    """Copy each parameter's values into its slice of ``flat`` (uint8; the values may sit on another
    device, e.g. the host) and make that slice its storage: the Parameter objects stay (tied ones
    share one), only their ``.data`` moves."""
    for name, view in parameter_views(params, offsets, flat).items():
        view.copy_(params[name].data)
        params[name].data = view
