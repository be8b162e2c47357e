"""HTTPRolloutClient against a real `rollout serve` process (native /generate and /admin routes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from rollout import SamplingParams
from rollout.integrations.http_rollout_client import HTTPRolloutClient
from rollout.integrations.rollout_client import sequence_logprobs

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory, _preset_cache):
    log = tmp_path_factory.mktemp("http") / "server.log"
    cmd = [sys.executable, "-m", "rollout.cli", "serve", "tiny", "--port", "0", "--device", "cpu"]
    cmd += ["--num-blocks", "256", "--enable-admin", "--admin-key", "adm", "--dtype", "float32"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    try:
        url, deadline = None, time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if line.startswith("rollout serve: listening on "):
                    url = line.rsplit(" ", 1)[1]
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(0.2)
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_http_generate_and_weight_update(server_url, hf_model, tmp_path):
    model, _ = hf_model
    client = HTTPRolloutClient(server_url, admin_key="adm", shared_dir=str(tmp_path / "w"))
    prompts = [[49, 50, 51, 62], [72, 105]]
    batch = client.generate(prompts, n=3, params=SamplingParams(max_tokens=5, seed=2, ignore_eos=True))
    assert len(batch) == 6 and batch.group_ids == [0, 0, 0, 1, 1, 1]
    assert all(len(c) == len(lp) == 5 for c, lp in zip(batch.completion_ids, batch.logprobs, strict=True))
    v0 = client.weight_version
    padded = batch.padded()
    with torch.no_grad():
        ref = sequence_logprobs(model, padded.input_ids, padded.attention_mask)
    m = padded.loss_mask.bool()
    torch.testing.assert_close(ref[m], padded.logprobs[m], atol=2e-5, rtol=0)
    assert client.update_weights(model, version=v0 + 5) == v0 + 5 == client.weight_version
    again = client.generate(prompts[:1], n=1, params=SamplingParams(max_tokens=2))
    assert again.weight_versions[0] == [v0 + 5, v0 + 5]
    # through shared_dir too: a wrapped module (its names were '_orig_mod.model...') and a tied
    # model's state dict (safetensors refused the shared lm_head) give the same greedy tokens
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = client.generate(prompts, n=1, params=greedy).completion_ids
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's wrapper holds
    for weights in (wrapped, model.state_dict()):
        version = client.weight_version + 1
        assert client.update_weights(weights) == version
        assert client.generate(prompts, n=1, params=greedy).completion_ids == want
