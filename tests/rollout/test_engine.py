"""Engine behaviour on the built-in tiny model and tiny checkpoints: caching and preemption change no
output, bad input changes nothing, aborts, stop conditions, seeds, limits."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys

import pytest
import torch

from rollout import LLM, CacheConfig, EngineCore, SamplingParams, SchedulerConfig
from tests.models.tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    save_tiny_checkpoint(path, "qwen3")
    return str(path)


@pytest.fixture(scope="module")
def tiny_engine():
    return LLM("tiny", device="cpu", cache_config=CacheConfig(num_blocks=256))


@pytest.fixture
def tiny(tiny_engine):
    """The shared tiny LLM; after each test its block pool must be whole and consistent again."""
    yield tiny_engine
    engine = tiny_engine.engine
    assert not engine.has_unfinished()
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    engine.check_invariants()


def shared_prefix_workload(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(300) for _ in range(37)]
    return [
        system[: rng.randint(5, 37)] + [rng.randrange(300) for _ in range(rng.randint(1, 20))]
        for _ in range(10)
    ]


def run_workload(path: str, prompts, params, **kwargs):
    llm = LLM(path, device="cpu", **kwargs)
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.stats()
    assert stats.num_free_blocks == stats.num_blocks, "blocks leaked"
    llm.engine.check_invariants()
    return outs, stats


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefix_caching_and_preemption_change_no_output(qwen3_path, temperature):
    prompts = shared_prefix_workload(0)
    params = SamplingParams(temperature=temperature, seed=7, max_tokens=30, n=2, ignore_eos=True)
    base, base_stats = run_workload(
        qwen3_path,
        prompts,
        params,
        cache_config=CacheConfig(block_size=4, num_blocks=1024, enable_prefix_caching=False),
    )
    cached, cached_stats = run_workload(
        qwen3_path, prompts, params, cache_config=CacheConfig(block_size=4, num_blocks=1024)
    )
    tight, tight_stats = run_workload(
        qwen3_path,
        prompts,
        params,
        cache_config=CacheConfig(block_size=4, num_blocks=40),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=8),
    )
    assert base_stats.num_cached_tokens == 0 and cached_stats.num_cached_tokens > 0
    assert cached_stats.num_prompt_tokens_computed < base_stats.num_prompt_tokens_computed
    assert tight_stats.num_preemptions > 0
    for a, b, c in zip(base, cached, tight, strict=True):
        for x, y, z in zip(a.outputs, b.outputs, c.outputs, strict=True):
            assert x.token_ids == y.token_ids == z.token_ids
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(z.logprobs), atol=1e-4, rtol=0)


def test_group_computes_its_prompt_once(qwen3_path):
    prompt = list(range(3, 67))  # 64 tokens = 4 blocks of 16
    outs, stats = run_workload(
        qwen3_path,
        [prompt],
        SamplingParams(n=8, max_tokens=4, ignore_eos=True),
        cache_config=CacheConfig(num_blocks=128),
    )
    assert len(outs[0].outputs) == 8
    # the first sample computes the prompt; the others reuse 3 blocks and recompute the last one
    assert stats.num_prompt_tokens == 8 * 64
    assert stats.num_prompt_tokens_computed == 64 + 7 * 16
    assert outs[0].num_cached_tokens == 7 * 48


BAD_PROMPTS = [
    ([], "empty"),
    ([1, -1], "-1"),
    ([1, 300], "300"),
    ([1, 2.5], "2.5"),
    (list(range(100)) * 2, "200 tokens"),
]


@pytest.mark.parametrize(("prompt", "match"), BAD_PROMPTS)
def test_bad_prompt_raises_and_changes_nothing(qwen3_path, prompt, match):
    llm = LLM(
        qwen3_path, device="cpu", max_model_len=128, cache_config=CacheConfig(block_size=4, num_blocks=64)
    )
    good = [1, 2, 3]
    with pytest.raises(ValueError, match=match):
        llm.generate([good, prompt], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    out = llm.generate([good], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    assert llm.stats().num_free_blocks == 64


def test_bad_params_raise(tiny):
    with pytest.raises(ValueError, match="max_tokens"):
        tiny.generate([[1, 2]], SamplingParams(max_tokens=-1))
    with pytest.raises(ValueError, match="stop_token_ids"):
        tiny.generate([[1, 2]], SamplingParams(stop_token_ids=[10**6]), use_tqdm=False)
    with pytest.raises(TypeError, match="from_dict"):  # a dict was read as a list of its keys
        tiny.generate([[1, 2]], {"max_tokens": 3}, use_tqdm=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        tiny.generate([[1, 2]], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="already in use"):
        tiny.engine.add_request("dup", [1], SamplingParams(max_tokens=1))
        tiny.engine.add_request("dup", [1], SamplingParams(max_tokens=1))
    tiny.engine.abort(["dup"])
    assert not tiny.engine.has_unfinished()


def test_request_ids_never_share_a_sample_id_and_prompt_logprobs_stay_apart(tiny):
    """Samples of an n > 1 request are named ``rid#i``: a request named like one of them (before or
    after) is refused, since a sample's prompt logprobs are keyed by its id (request "a#0" used to
    get "a"'s); other ids with '#' are fine, and each request gets its own prompt logprobs."""
    engine: EngineCore = tiny.engine
    two = SamplingParams(n=2, prompt_logprobs=0, max_tokens=2, temperature=0)
    one = SamplingParams(prompt_logprobs=0, max_tokens=2, temperature=0)
    long, short = list(range(1, 11)), [20, 21, 22, 23]
    engine.add_request("a", long, two)
    for rid, params in (("a#0", one), ("a#1", one), ("a", one)):
        with pytest.raises(ValueError, match=r"taken by request 'a'|already in use"):
            engine.add_request(rid, short, params)
    engine.add_request("a#2", short, one)  # not a sample of "a" (n = 2)
    engine.add_request("b#0", short, one)
    with pytest.raises(ValueError, match=r"sample id 'b#0' is taken by request 'b#0'"):
        engine.add_request("b", long, two)
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step())
    assert sorted(outs) == ["a", "a#2", "b#0"]
    assert len(outs["a"].prompt_logprobs) == len(long) and len(outs["a#2"].prompt_logprobs) == len(short)


def test_generate_queues_all_or_nothing_and_returns_only_its_own(tiny):
    """LLM.generate queues the ids it validated (a one-shot iterator prompt is read once), takes
    back what it queued when a later add fails, and returns only its own outputs while requests
    queued on the engine directly finish beside it (a KeyError before)."""
    engine: EngineCore = tiny.engine
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = tiny.generate([[1, 2, 3], iter([4, 5, 6])], greedy, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [[1, 2, 3], [4, 5, 6]]
    engine.add_request("mine", [7, 8], SamplingParams(max_tokens=1))
    (out,) = tiny.generate([[9, 10]], greedy, use_tqdm=False)
    assert out.prompt_token_ids == [9, 10] and "mine" not in engine.request_ids
    k = int(tiny.generate([[1]], greedy, use_tqdm=False)[0].request_id.split("-")[1])
    engine.add_request(f"llm-{k + 2}", [7, 8], SamplingParams(max_tokens=500, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        tiny.generate([[1, 2], [3, 4]], greedy, use_tqdm=False)  # llm-{k+1} queued, llm-{k+2} clashes
    assert engine.request_ids == [f"llm-{k + 2}"]
    engine.abort([f"llm-{k + 2}"])


def test_cached_token_counts_come_from_the_admission_that_succeeds():
    """A request that matched cached blocks but could not grow is put back, and those blocks may be
    evicted before it is admitted: it reported the first attempt's hits (12 tokens "cached" where 4
    were)."""
    llm = LLM("tiny", device="cpu", cache_config=CacheConfig(block_size=4, num_blocks=10))
    e = llm.engine
    greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    p = list(range(10, 22))  # 3 blocks, cached once done
    e.add_request("p", p, greedy)
    while e.has_unfinished():
        e.step()
    e.add_request("l", list(range(100, 120)), greedy.replace(max_tokens=16))  # grows to 9 blocks
    e.step()
    before = e.stats()
    e.add_request("q", p + list(range(200, 216)), greedy.replace(max_tokens=2))
    outs = {}
    while e.has_unfinished():
        outs.update((o.request_id, o) for o in e.step())
    computed = e.stats().num_prompt_tokens_computed - before.num_prompt_tokens_computed
    q = outs["q"].outputs[0]
    assert q.num_cached_tokens == 28 - computed
    assert e.stats().num_cached_tokens - before.num_cached_tokens == q.num_cached_tokens
    e.check_invariants()


def test_abort_returns_partial_output_and_frees_blocks(tiny):
    engine: EngineCore = tiny.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True, seed=1))
    engine.add_request("b", [8, 9], SamplingParams(max_tokens=5, ignore_eos=True, n=2))
    finished = []
    for _ in range(8):
        finished += engine.step()
    assert [o.request_id for o in finished] == ["b"]
    (aborted,) = engine.abort(["a", "never-existed"])
    sample = aborted.outputs[0]
    assert sample.finish_reason == "abort" and len(sample.token_ids) == 8 == len(sample.logprobs)
    assert not engine.has_unfinished()
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    engine.check_invariants()


def test_stop_token_ids_stop_strings_and_min_tokens(tiny):
    prompt = "The cat"
    greedy = tiny.generate(
        prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    ids = greedy[0].outputs[0].token_ids
    text = greedy[0].outputs[0].text
    # stop token: the first occurrence of the 6th token ends the sample there
    stop_tok = ids[5]
    cut = ids.index(stop_tok)
    out = tiny.generate(
        prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok]), use_tqdm=False
    )
    c = out[0].outputs[0]
    assert c.token_ids == ids[: cut + 1] and c.finish_reason == "stop" and c.stop_reason == stop_tok
    # the stop token's text is left out (as vLLM), unless include_stop_str_in_output
    assert c.text == tiny.get_tokenizer().decode(ids[:cut])
    params = SamplingParams(
        temperature=0, max_tokens=20, stop_token_ids=[stop_tok], include_stop_str_in_output=True
    )
    assert tiny.generate(prompt, params, use_tqdm=False)[0].outputs[0].text == tiny.get_tokenizer().decode(
        ids[: cut + 1]
    )
    # the same with a stop string that never matches
    out = tiny.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok], stop=["\x00never"]),
        use_tqdm=False,
    )
    assert out[0].outputs[0].text == c.text
    # min_tokens bans the stop token before it: the output then differs from the greedy one
    if cut + 1 < 10:
        out = tiny.generate(
            prompt,
            SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok], min_tokens=10),
            use_tqdm=False,
        )
        assert stop_tok not in out[0].outputs[0].token_ids[:10]
    # stop strings are found in the text and cut from it (the output biased to ASCII letters: the
    # random model's bytes are mostly invalid UTF-8, and a stop string is matched in whole characters)
    assert text == tiny.get_tokenizer().decode(ids)
    letters = SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, logit_bias={t: 50.0 for t in range(97, 123)}
    )
    decoded = tiny.generate(prompt, letters, use_tqdm=False)[0].outputs[0].text
    assert decoded.isascii() and len(decoded) == 20
    stop = decoded[8:10]
    c = tiny.generate(prompt, letters.replace(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == decoded[: decoded.index(stop)] and len(c.token_ids) == decoded.index(stop) + 2
    params = letters.replace(stop=[stop], include_stop_str_in_output=True)
    out = tiny.generate(prompt, params, use_tqdm=False)
    assert out[0].outputs[0].text == decoded[: decoded.index(stop) + len(stop)]
    # stop strings are ignored before min_tokens, and one that ended there never matches later (as
    # vLLM); the output forced to "aaaa..." by a logit bias
    forced = SamplingParams(temperature=0, max_tokens=20, stop=["aa"], logit_bias={97: 100.0})
    c = tiny.generate(prompt, forced, use_tqdm=False)[0].outputs[0]
    assert c.token_ids == [97, 97] and c.text == "" and c.stop_reason == "aa"
    # the first search comes with token min_tokens + 1 (as EOS is first allowed there), over the
    # new text and the last len(stop) - 1 characters before it
    c = tiny.generate(prompt, forced.replace(min_tokens=5), use_tqdm=False)[0].outputs[0]
    assert c.token_ids == [97] * 6 and c.text == "aaaa" and c.finish_reason == "stop"


def test_eos_stops_unless_ignored(qwen3_path):
    # make the model's EOS the token greedy decoding produces first
    llm = LLM(qwen3_path, device="cpu", cache_config=CacheConfig(num_blocks=32))
    first = llm.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    tok = first.outputs[0].token_ids[0]
    llm.engine.model_config = dataclasses.replace(llm.engine.model_config, eos_token_ids=(tok,))
    out = llm.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [tok] and out.finish_reason == "stop" and out.stop_reason is None
    out = llm.generate(
        [[4, 5, 6]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 5 and out[0].outputs[0].finish_reason == "length"


def test_seeds_reproduce_across_batches_and_n_differs(tiny):
    p = SamplingParams(seed=123, max_tokens=12, ignore_eos=True)
    alone = tiny.generate([[1, 2, 3]], p, use_tqdm=False)[0].outputs[0].token_ids
    crowd = tiny.generate([[9, 9], [1, 2, 3], [4]], p, use_tqdm=False)[1].outputs[0].token_ids
    assert alone == crowd
    other = tiny.generate([[1, 2, 3]], p.replace(seed=124), use_tqdm=False)[0].outputs[0].token_ids
    assert other != alone
    many = tiny.generate([[1, 2, 3]], p.replace(n=4), use_tqdm=False)[0].outputs
    assert len({tuple(c.token_ids) for c in many}) == 4
    assert [c.index for c in many] == [0, 1, 2, 3]


def test_seeds_distinct_modulo_2_64_sample_differently(tiny):
    # Sample seeds are derived mod 2**64 (they were mod 2**63: seeds 0 and 2**63, and -1 and
    # 2**63 - 1, drew the same tokens); as torch.manual_seed, -1 and 2**64 - 1 are one seed.
    def tokens(seed: int, n: int = 1) -> list[tuple[int, ...]]:
        p = SamplingParams(seed=seed, max_tokens=16, ignore_eos=True, n=n)
        return [tuple(c.token_ids) for c in tiny.generate([[1, 2, 3]], p, use_tqdm=False)[0].outputs]

    assert tokens(0) != tokens(2**63)
    assert tokens(-1) != tokens(2**63 - 1)
    assert tokens(-1) == tokens(2**64 - 1)
    assert tokens(2**64 - 1, n=3)[0] == tokens(2**64 - 1)[0]  # sample 0 keeps the seed itself
    assert len(set(tokens(2**63, n=3))) == 3


def test_steady_decode_reuses_sampling_tensors(tiny, sampling_builds):
    # A decode step over the same rows as the step before advances the previous sampling tensors'
    # RNG counters on the device instead of building new ones; any change of rows rebuilds them.
    builds = sampling_builds
    p = SamplingParams(seed=7, max_tokens=24, ignore_eos=True)
    alone = tiny.generate([[1, 2, 3]], p, use_tqdm=False)[0].outputs[0].token_ids
    assert builds == [1]  # 24 sampling steps, one build
    builds.clear()
    # the same seed inside a batch whose rows change as the others finish (and one bans EOS)
    others = [p.replace(seed=8, max_tokens=5), p.replace(seed=9, max_tokens=11, min_tokens=3)]
    crowd = tiny.generate([[4, 4], [1, 2, 3], [5]], [others[0], p, others[1]], use_tqdm=False)
    assert crowd[1].outputs[0].token_ids == alone
    assert len(builds) > 2 and builds[-1] == 1  # rebuilt when rows left, then reused again


@pytest.mark.parametrize("overlap", [False, True])
def test_wide_batches_match_single_sequences(qwen3_path, overlap):
    # Batches of more than 8 sequences build their block tables from one flat array, single
    # sequences row by row: both must feed the model the same blocks and slots.
    llm = LLM(
        qwen3_path,
        device="cpu",
        cache_config=CacheConfig(block_size=4, num_blocks=512),
        scheduler_config=SchedulerConfig(overlap=overlap),
    )
    prompts = shared_prefix_workload(3) + shared_prefix_workload(4)[:4]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    together = llm.generate(prompts, params, use_tqdm=False)
    alone = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]


def test_generation_stops_at_context_length(qwen3_path):
    llm = LLM(
        qwen3_path, device="cpu", max_model_len=20, cache_config=CacheConfig(block_size=4, num_blocks=64)
    )
    out = llm.generate([list(range(1, 16))], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5 and out[0].outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(qwen3_path, device="cpu", max_model_len=10**6)


def test_without_chunked_prefill_a_sequence_fits_one_step(qwen3_path):
    """With chunked prefill off a sequence must fit one step's token budget (its prompt, and its
    recompute after a preemption): longer prompts are refused, outputs stop there with "length".
    Before, such sequences were queued and never scheduled (generate spun forever)."""
    llm = LLM(
        qwen3_path,
        device="cpu",
        cache_config=CacheConfig(block_size=4, num_blocks=6),  # two sequences preempt each other
        scheduler_config=SchedulerConfig(max_num_batched_tokens=16, enable_chunked_prefill=False),
    )
    engine = llm.engine
    with pytest.raises(ValueError, match="20 tokens"):
        engine.add_request("long", list(range(1, 21)), SamplingParams(max_tokens=4))
    params = SamplingParams(max_tokens=100, ignore_eos=True, temperature=0)
    engine.add_request("x", list(range(1, 11)), params)
    engine.add_request("y", list(range(11, 21)), params)
    outs = []
    for _ in range(200):  # bounded: a regression fails here instead of hanging
        outs += engine.step()
        if not engine.has_unfinished():
            break
    assert sorted(o.request_id for o in outs) == ["x", "y"]
    for out in outs:
        assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"
    assert sum(o.outputs[0].num_preemptions for o in outs) > 0
    engine.check_invariants()


def test_weight_versions_and_counters(tiny):
    out = tiny.generate([[1, 2]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.weight_versions == [0, 0, 0, 0]
    assert out.num_preemptions == 0


def test_cli_generate_json():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rollout.cli",
            "generate",
            "tiny",
            "--prompt",
            "hi",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--json",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    (record,) = json.loads(proc.stdout)
    assert record["prompt"] == "hi" and len(record["token_ids"]) == 4 and record["finish_reason"] == "length"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "rollout.cli",
            "generate",
            "tiny",
            "--prompt-ids",
            "[1, 99999]",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "99999" in bad.stderr


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["demo", "--help"], 0, "rollout demo grpo"),  # argparse refused the leading --help
        (["bench", "--help"], 0, "step_profile"),
        (["bench"], 2, "workloads"),
        (["generate", "tiny", "--prompt-ids", "5"], 2, "must be a JSON list"),  # ran as the prompt [5]
        (["generate", "tiny", "--prompt-ids", "[1,"], 2, "is not JSON"),
        (["generate", "tiny", "--prompt", "x", "--prompt-ids", "[1]"], 2, "not allowed with"),
        (["generate", "tiny", "--device", "bogus"], 2, "is not a device"),
        (["generate", "tiny", "--device", "meta"], 2, "only cuda and cpu"),
        (["serve", "tiny", "--port", "99999"], 2, "--port"),  # an OverflowError traceback
        (["serve", "tiny", "--max-model-len", "0"], 2, "--max-model-len"),
        (["demo", "grpo", "--threads", "0"], 2, "--threads must be >= 1"),  # after engine start-up
    ],
)
def test_cli_refuses_bad_arguments_clearly(argv, code, says, capsys):
    from rollout.cli import main

    try:
        got = main(argv)
    except SystemExit as e:  # argparse's own errors and --help
        got = e.code
    out = capsys.readouterr()
    assert got == code and says in out.out + out.err, (got, out)


def test_cli_generate_repeated_prompt_ids_are_separate_prompts(capsys):
    from rollout.cli import main

    argv = ["generate", "tiny", "--prompt-ids", "[5]", "--prompt-ids", "[6]", "--max-tokens", "2"]
    assert main([*argv, "--json", "--device", "cpu"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["prompt_token_ids"] for r in records] == [[5], [6]]  # was one prompt [5, 6]


def test_memory_profile_step_samples_max_num_seqs_rows_the_costliest_way():
    """The KV budget's profile step runs the forward on one prompt of the step budget, then samples
    max_num_seqs rows on the torch path with top-p, min-p, penalties and processed top logprobs
    (each a [rows, vocab] fp32 temporary or more) so that their memory counts in the peak."""
    from rollout.samplers.params import MAX_LOGPROBS

    llm = LLM(
        "tiny",
        device="cpu",
        cache_config=CacheConfig(num_blocks=64),
        scheduler_config=SchedulerConfig(max_num_seqs=12, max_num_batched_tokens=96),
    )
    runner = llm.engine.runner
    out = runner.profile_step(96)
    assert out.token_ids.shape == (12,) and out.topk_ids is not None
    assert out.topk_ids.shape == (12, MAX_LOGPROBS)
    assert ((out.token_ids >= 0) & (out.token_ids < runner.vocab_size)).all()
    # processed logprobs under top-p 0.9: the sampled token is never one the filter removed
    assert torch.isfinite(out.logprobs).all()
    assert runner.profile_step(5).token_ids.shape == (5,)  # fewer tokens than max_num_seqs: one row each


def test_memory_profile_step_above_max_model_len_runs_several_prompts():
    """A step's token budget may exceed max_model_len (many sequences share a step): the profile
    step then runs prompts of at most max_model_len tokens, each in its own blocks, with positions
    restarting per prompt (the rotary table ends at max_model_len)."""
    from rollout.step_inputs import profile_blocks, profile_step_meta

    num_blocks = profile_blocks(100, 40, 16)
    meta, positions = profile_step_meta(100, 40, 16, torch.device("cpu"))
    assert meta.seq_lens_host == [40, 40, 20] and num_blocks == 3 + 3 + 2
    assert meta.block_tables.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 0]]
    assert meta.slot_mapping[[0, 39, 40, 80, 99]].tolist() == [0, 39, 48, 96, 115]
    assert positions[40] == 0 and positions.max() == 39
    llm = LLM(
        "tiny",
        device="cpu",
        max_model_len=40,
        cache_config=CacheConfig(num_blocks=num_blocks, block_size=16),
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100),
    )
    out = llm.engine.runner.profile_step(100)
    assert out.token_ids.shape == (4,) and torch.isfinite(out.logprobs).all()
