"""Run the Triton kernels through Triton's interpreter when no CUDA device is present.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a function, i.e. when a kernel module
is imported, so the variable is set here, before the test modules import the kernels. If another
test module imported a kernel module first (compiled for a GPU that is not there), that module is
re-executed: ``importlib.reload`` refills the module's own namespace, so launchers that callers
already imported pick up the interpreted kernels too.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

KERNEL_MODULES = (
    "rollout.kernels.store_kv",
    "rollout.kernels.decode_attention",
    "rollout.kernels.prefill_attention",
)

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])
