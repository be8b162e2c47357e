"""Run the Triton kernels through Triton's interpreter when no CUDA device is present.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a function: for our kernels when their
module is imported, and for Triton's own jit'd helpers (``tl.cdiv``, ``tl.maximum`` ...) when
``triton.language`` is imported. So the variable must be set before anything imports Triton; this
conftest is imported when pytest collects tests/kernels, before its test modules. If something
collected earlier already imported Triton for a GPU that is not there, reloading modules cannot
repair it (Triton's helpers stay compiled-only): ``triton_interpreter`` then fails with the fix.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def triton_interpreter() -> None:
    """Fail clearly when the CPU run cannot use the interpreter (see the module docstring)."""
    if torch.cuda.is_available():
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.cdiv, InterpretedFunction):
        pytest.fail(
            "Triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
            "run with TRITON_INTERPRET=1 in the environment or run tests/kernels first"
        )


@pytest.fixture
def interpreter_engine(triton_interpreter: None) -> None:
    """For tests of an engine on ``device="cpu"`` with the triton backend: its kernels must run in the
    interpreter, which is off where CUDA is (compiled, they would get CPU tensors). Skipped there;
    the ``-m gpu`` tests cover the device. With ``graph_sampling`` / ``graph_inputs`` on (the
    defaults) such an engine builds uncaptured decode graphs at start, one interpreted forward per
    graph size up to ``max_num_seqs`` (capped by ``max_graph_batch``; minutes at the defaults):
    keep it small, or turn both off to test the eager decode path."""
    if torch.cuda.is_available():
        pytest.skip("interpreter engine test (CPU only)")
