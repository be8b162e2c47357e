"""``HTTPRolloutClient``: a ``RolloutClient`` for an engine behind a running server (``rollout serve``).

It speaks the server's native routes (``POST /generate``, ``/admin/*``) through ``urllib``, so a
trainer needs no HTTP package, and returns the same ``RolloutBatch`` as the in-process client. Kept
apart from ``rollout_client`` because it alone carries the HTTP, thread-pool and weight-sender
plumbing.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from rollout.client import EngineInfo
from rollout.integrations.rollout_client import RolloutBatch, check_prompt_ids, rollout_params
from rollout.outputs import RequestOutput
from rollout.samplers.params import SamplingParams
from rollout.weight_sync.params import full_weights
from rollout.weight_sync.sender import Weights, WeightSender


class HTTPRolloutClient:
    """A ``RolloutClient`` over a running server's native route (``rollout serve ...``): one
    ``POST /generate`` per prompt, sent concurrently; control calls through ``/admin/*`` (needs the
    server's ``enable_admin`` and its admin key).

    Weights: ``update_weights(model)`` pushes them over a process group this process hosts (a
    ``WeightSender`` through the weight-group admin routes: gloo to a CPU engine, NCCL to a GPU one);
    ``weight_host`` is this process's address as the server reaches it. With ``shared_dir`` (a
    directory both sides see) it writes safetensors there and has the server reload them instead;
    ``update_weights_from_disk(path)`` reloads a directory the server reads. The control calls
    (``call`` / ``start_call`` / ``wait_call`` / ``info``) make this client a ``WeightSender``'s
    ``EngineControl``."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        shared_dir: str | None = None,
        weight_host: str = "127.0.0.1",
        max_concurrency: int = 64,
        timeout_s: float = 600.0,
        mask_truncated: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key, self.admin_key = api_key, admin_key
        self.shared_dir = shared_dir
        self.weight_host = weight_host
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.mask_truncated = mask_truncated
        self._info: EngineInfo | None = None
        self._sender: WeightSender | None = None  # kept between updates (its group stays open)
        self._pool: ThreadPoolExecutor | None = None  # runs started control calls
        self._calls: dict[int, Future[Any]] = {}
        self._call_ids = 0

    def _request(self, path: str, body: dict[str, Any] | None, key: str | None, timeout_s: float) -> Any:
        """GET (``body`` None) or POST JSON; 400 raises ``ValueError``, other errors ``RuntimeError``."""
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data, verb = (None, "GET") if body is None else (json.dumps(body).encode(), "POST")
        req = urllib.request.Request(self.base_url + path, data, headers, method=verb)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise (ValueError if e.code == 400 else RuntimeError)(
                f"{path}: HTTP {e.code}: {detail}"
            ) from None

    def _post(self, path: str, body: dict[str, Any], key: str | None) -> Any:
        return self._request(path, body, key, self.timeout_s)

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], n: int = 1, params: SamplingParams | None = None
    ) -> RolloutBatch:
        from rollout.outputs import CompletionOutput

        prompts = check_prompt_ids(prompt_ids)
        body = rollout_params(params, n).to_dict()

        def one(p: list[int]) -> RequestOutput:
            r = self._post("/generate", {"prompt_token_ids": p, "sampling_params": body}, self.api_key)
            samples = [
                CompletionOutput(
                    o["index"],
                    o["token_ids"],
                    o["logprobs"],
                    None,
                    o["weight_versions"],
                    o["finish_reason"],
                    o.get("stop_reason"),
                    o.get("text"),
                )
                for o in r["outputs"]
            ]
            return RequestOutput(r["request_id"], r["prompt_token_ids"], samples, finished=True)

        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompts)))) as pool:
            outputs = list(pool.map(one, prompts))
        return RolloutBatch.from_outputs(outputs, n, mask_truncated=self.mask_truncated)

    # ---- control calls (``EngineControl``) ------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        """What the engine reported at start-up (device, dtype, ...), from ``GET /admin/info``."""
        if self._info is None:
            self._info = EngineInfo(**self._request("/admin/info", None, self.admin_key, self.timeout_s))
        return self._info

    def call(self, method: str, timeout_s: float | None = None, **args: Any) -> Any:
        """``POST /admin/<method>`` with ``args``; its result (a 400 raises ``ValueError``)."""
        return self._request(f"/admin/{method}", args, self.admin_key, timeout_s or self.timeout_s)["result"]

    def start_call(self, method: str, **args: Any) -> int:
        """Start a control call in a worker thread and return its id for ``wait_call`` (a weight-group
        call returns only once this process did its part: joined the group, sent the buckets)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rollout-admin")
        self._call_ids += 1
        self._calls[self._call_ids] = self._pool.submit(
            self._request, f"/admin/{method}", args, self.admin_key, self.timeout_s
        )
        return self._call_ids

    def wait_call(self, call_id: int, method: str = "call", timeout_s: float = 600.0) -> Any:
        future = self._calls[call_id]
        try:
            result = future.result(timeout_s)["result"]
        except FutureTimeout:
            raise TimeoutError(f"{method}() got no answer in {timeout_s} s") from None
        del self._calls[call_id]
        return result

    def update_weights_from_disk(self, path: str, version: int | None = None, pause: str = "keep") -> int:
        return int(self.call("update_weights_from_disk", path=str(path), version=version, pause=pause))

    def update_weights(
        self,
        weights: Weights,
        version: int | None = None,
        pause: str = "keep",
    ) -> int:
        """Push weights (a module, plain or wrapped, a state dict or ``(hf_name, tensor)`` pairs; see
        the class doc); returns the new weight version."""
        if self.shared_dir is None:
            if self._sender is None:
                self._sender = WeightSender(self, host=self.weight_host, timeout_s=self.timeout_s)
            return int(self._sender.push(weights, version=version, pause=pause))
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
        with full_weights(weights) as items:  # unwraps DDP / compile / FSDP, takes a state dict
            for w in items:
                t = w.get().detach()
                key = (t.data_ptr(), tuple(t.shape), t.dtype)
                if key in seen:  # a tied alias (safetensors refuses shared memory); the engine ties
                    continue
                seen.add(key)
                tensors[w.name] = t.to("cpu").contiguous()
        os.makedirs(self.shared_dir, exist_ok=True)
        save_file(tensors, os.path.join(self.shared_dir, "model.safetensors"))
        return self.update_weights_from_disk(self.shared_dir, version=version, pause=pause)

    def sleep(self, level: int = 1) -> Any:
        return self.call("sleep", level=level)

    def wake_up(self, tags: list[str] | None = None) -> Any:
        return self.call("wake_up", tags=tags)

    @property
    def weight_version(self) -> int:
        return int(self._request("/admin/state", None, self.admin_key, self.timeout_s)["weight_version"])

    def close(self) -> None:
        """Leave the weight group (the server leaves too; idempotent)."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> HTTPRolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
