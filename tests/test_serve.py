"""duoattn serve: the real ``openai`` client against servers started in-process on 127.0.0.1.

The reference for every greedy answer is ``model.generate(do_sample=False)`` under DuoAttention on the same model
(same prefill chunk size). The fast tests use a tiny random Llama built around the embedded SmolLM2 tokenizer (so
text and the chat template are real); the slow test serves the embedded model itself.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import openai
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from duoattn import HeadPattern, disable_duo_attention, enable_duo_attention
from duoattn.models import load_tokenizer
from duoattn.serve import Engine, ServeConfig
from duoattn.serve.app import build_app
from duoattn.serve.server import running_server
from duoattn.serve.text import TextStream

NAME = "tiny"
CHUNK = 16  # prefill chunk of the servers and of the reference generate
CONTEXT = 2048
SINK, RECENT = 4, 8  # small: prompts of the tests are longer, so streaming heads really evict


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


PATTERN = HeadPattern(np.array([[0.9, 0.1], [0.2, 0.8]]), sink=SINK, recent=RECENT)  # one retrieval head a layer


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    """A 2-layer random Llama over the SmolLM2 vocabulary (float64, seeded)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                         attn_implementation="sdpa", initializer_range=0.5)  # wide init: prompts change answers
    return LlamaForCausalLM(config).to(torch.float64).eval()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """The tiny Llama with DuoAttention on (one retrieval, one streaming head per layer)."""
    model = tiny_llama(tokenizer)
    handle = enable_duo_attention(model, PATTERN, sparsity=0.5, prefill_chunk_size=CHUNK)
    yield model, handle
    disable_duo_attention(model)


@dataclass
class Served:
    url: str
    engine: Engine
    client: openai.OpenAI

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict]:
        """A raw POST (for bodies the openai client would never send); status and JSON body."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def metric(self, name: str) -> float:
        value = self.engine.metrics.registry.get_sample_value(name)
        return 0.0 if value is None else value


@contextmanager
def _serve(tiny, tokenizer, **overrides) -> Iterator[Served]:
    model, handle = tiny
    settings = dict(prefill_chunk=CHUNK, max_model_len=CONTEXT, max_batch=16, queue_size=16, queue_timeout=20.0,
                    kv_budget_gib=16 * handle.expected_kv_bytes(CONTEXT) / 2**30)
    engine = Engine(model, tokenizer, handle, ServeConfig(**{**settings, **overrides}), NAME)
    with running_server(build_app(engine)) as url:
        yield Served(url, engine, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60))


@pytest.fixture(scope="module")
def served(tiny, tokenizer):
    with _serve(tiny, tokenizer) as served:
        yield served


def reference(model, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """Greedy tokens of ``model.generate`` under DuoAttention (up to and without EOS) and the finish reason."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    if eos in new:
        return new[: new.index(eos)], "stop"
    return new, "length"


def random_ids(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()  # no special tokens


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def complete(client: openai.OpenAI, stream: bool, **kwargs) -> tuple[str, str]:
    """Text and finish reason of a completion, streamed or not."""
    if not stream:
        choice = client.completions.create(model=NAME, stream=False, **kwargs).choices[0]
        return choice.text, choice.finish_reason
    text, reason = "", None
    for chunk in client.completions.create(model=NAME, stream=True, **kwargs):
        text += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason or reason
    return text, reason


# ------------------------------------------------------------------------------------------------ answers
@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_generate(served, tiny, tokenizer, stream):
    model, _ = tiny
    for prompt in ["Hello", "The quick brown fox jumps over the lazy dog; then it runs far away into the dark "
                   "forest, where nobody will ever find it again, not even the hunters."]:
        ids = tokenizer(prompt).input_ids
        tokens, reason = reference(model, ids, 12)
        text, got_reason = complete(served.client, stream, prompt=prompt, max_tokens=12, temperature=0)
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)
        assert got_reason == reason
    assert len(tokenizer(prompt).input_ids) > CHUNK + SINK + RECENT  # chunked prefill, streaming heads evicted
    usage = served.client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0).usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(tokens))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_generate(served, tiny, tokenizer, stream):
    model, _ = tiny
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France, and why is it famous?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    tokens, reason = reference(model, ids, 10)
    kwargs = dict(model=NAME, messages=messages, max_tokens=10, temperature=0)
    if stream:
        chunks = list(served.client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                            **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant"
        usage = chunks.pop()  # the usage chunk comes last, without choices
        assert usage.choices == [] and usage.usage.completion_tokens == len(tokens)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        got_reason = chunks[-1].choices[0].finish_reason
    else:
        reply = served.client.chat.completions.create(**kwargs)
        text, got_reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert reply.usage.prompt_tokens == len(ids)
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert got_reason == reason


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_ends_the_text_before_it(served, tiny, tokenizer, stream):
    model, _ = tiny
    ids = random_ids(10, 1, len(tokenizer))
    full = tokenizer.decode(reference(model, ids, 16)[0], skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    before = served.metric("duoattn_cancelled_requests_total")
    text, reason = complete(served.client, stream, prompt=ids, max_tokens=16, temperature=0, stop=[stop, "\x00"])
    assert (text, reason) == (full[: full.index(stop)], "stop")
    assert wait_until(lambda: served.engine.pool.running == 0)
    assert served.metric("duoattn_cancelled_requests_total") == before + 1  # the worker stopped generating


def test_text_stream_joins_to_decode_and_stops_across_tokens(tokenizer):
    ids = tokenizer("Grüße aus Köln: naïve café, 東京 and the end.").input_ids
    stream = TextStream(tokenizer)
    assert "".join(stream.add(t) for t in ids) + stream.finish() == tokenizer.decode(ids, skip_special_tokens=True)
    stream = TextStream(tokenizer, stops=["é, 東"])  # spans several tokens and a multi-byte character
    pieces = [stream.add(t) for t in ids]
    assert stream.stopped and "".join(pieces) == "Grüße aus Köln: naïve caf"
    assert stream.finish() == ""


# -------------------------------------------------------------------------------------------- concurrency
def test_concurrent_clients_get_their_own_answers(served, tiny, tokenizer):
    """8 greedy clients of different prompt lengths (some prefilled in several chunks) and 2 seeded samplers, all
    at once, each get exactly what it gets alone."""
    model, _ = tiny
    vocab = len(tokenizer)
    greedy = [(random_ids(n, 100 + n, vocab), 8 + n % 5, n % 2 == 0) for n in (3, 9, 17, 25, 33, 41, 57, 70)]
    expected = [tokenizer.decode(reference(model, ids, m)[0], skip_special_tokens=True) for ids, m, _ in greedy]
    sampled = [dict(prompt=random_ids(20, 7 + s, vocab), max_tokens=10, temperature=0.9, top_p=0.9, seed=s)
               for s in (1, 2)]
    alone = [complete(served.client, False, **kw)[0] for kw in sampled]
    assert alone[0] != complete(served.client, False, **{**sampled[0], "seed": 3})[0]  # the seed matters
    jobs = [(dict(prompt=ids, max_tokens=m, temperature=0), stream) for ids, m, stream in greedy]
    jobs += [(kw, i == 0) for i, kw in enumerate(sampled)]
    engine, handle = served.engine, tiny[1]

    def admit_when_all_arrived(*args, **kwargs):
        # The worker admits the first request only once every request holds its memory (and so is in the
        # worker's inbox): all of them then run interleaved, however fast the machine is.
        wait_until(lambda: engine.pool.running == len(jobs), timeout=30)
        return handle.new_cache(*args, **kwargs)

    engine.scheduler.peak_running = 0
    engine.scheduler.new_cache = admit_when_all_arrived
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: complete(served.client, job[1], **job[0])[0], jobs))
    finally:
        engine.scheduler.new_cache = handle.new_cache
    assert answers == expected + alone
    assert engine.scheduler.peak_running == len(jobs)  # all of them ran interleaved
    assert wait_until(lambda: served.engine.pool.in_use == 0)


@pytest.mark.parametrize("mode", ["full", "window:12"])
def test_prefill_modes_serve_what_generate_answers(tokenizer, mode):
    """A server prefilling with ``full`` / ``window:N`` answers concurrent clients exactly as ``generate`` does
    under the same mode (itself tested against the dense oracle), and its pool keeps one prompt's history aside."""
    model = tiny_llama(tokenizer)
    vocab = len(tokenizer)
    prompts = [random_ids(n, 300 + n, vocab) for n in (9, 40, 57, 70)]  # 57 and 70: several chunks
    handle = enable_duo_attention(model, PATTERN, sparsity=0.5, prefill_chunk_size=CHUNK, prefill=mode)
    try:
        expected = [reference(model, ids, 10)[0] for ids in prompts]
        budget = 16 * handle.expected_kv_bytes(CONTEXT)
        engine = Engine(model, tokenizer, handle, ServeConfig(prefill_chunk=CHUNK, max_model_len=CONTEXT,
                                                              kv_budget_gib=budget / 2**30, prefill=mode), NAME)
        # 2 layers x 1 streaming head x 2048 tokens x head_dim 8 x float64, keys and values; window: one layer's.
        history = 2 * 1 * CONTEXT * 8 * 8 * 2 // (2 if mode.startswith("window") else 1)
        assert engine.prefill_reserve == history and engine.pool.capacity == budget - history
        with running_server(build_app(engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            with ThreadPoolExecutor(len(prompts)) as pool:
                answers = list(pool.map(lambda ids: client.completions.create(
                    model=NAME, prompt=ids, max_tokens=10, temperature=0).choices[0].text, prompts))
            assert wait_until(lambda: engine.pool.in_use == 0)
    finally:
        disable_duo_attention(model)
    assert answers == [tokenizer.decode(t, skip_special_tokens=True) for t in expected]
    handle = enable_duo_attention(model, PATTERN, sparsity=0.5, prefill_chunk_size=CHUNK)
    try:  # the mode changes answers on these prompts: the test would see a server that ignored it
        assert [reference(model, ids, 10)[0] for ids in prompts] != expected
        with pytest.raises(ValueError, match=f"config.prefill is '{mode}' but the model's DuoAttention prefills "
                                             "with 'streaming'"):
            Engine(model, tokenizer, handle, ServeConfig(prefill=mode), NAME)
    finally:
        disable_duo_attention(model)


def test_a_prefill_history_larger_than_the_budget_is_refused(tokenizer):
    model = tiny_llama(tokenizer)
    handle = enable_duo_attention(model, PATTERN, sparsity=0.5, prefill_chunk_size=CHUNK, prefill="full")
    with pytest.raises(ValueError, match="prefill 'full' needs 0.00 GiB for the history of a 2048-token prompt, "
                                         "more than the KV budget"):  # the history: 2**19 bytes
        Engine(model, tokenizer, handle, ServeConfig(max_model_len=CONTEXT, kv_budget_gib=2**18 / 2**30,
                                                     prefill="full"), NAME)


def test_disconnect_mid_stream_frees_memory(served, tokenizer):
    engine = served.engine
    ids = random_ids(30, 5, len(tokenizer))
    max_tokens = CONTEXT - len(ids)
    cancelled = served.metric("duoattn_cancelled_requests_total")
    stream = served.client.completions.create(model=NAME, prompt=ids, max_tokens=max_tokens, temperature=0,
                                              stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert engine.pool.in_use == engine.handle.expected_kv_bytes(len(ids) + max_tokens)  # reserved while it runs
    (running,) = engine.scheduler.running
    assert running.cache.kv_bytes() == engine.pool.in_use  # the reservation is what the cache really holds
    stream.close()
    assert wait_until(lambda: engine.pool.in_use == 0 and engine.pool.running == 0)
    assert engine.pool.free == engine.pool.capacity
    assert served.metric("duoattn_cancelled_requests_total") == cancelled + 1
    assert not engine.scheduler.running
    assert complete(served.client, False, prompt="Still serving?", max_tokens=2, temperature=0)[1] == "length"


# ------------------------------------------------------------------------------------------------- errors
BAD_REQUESTS = [
    # (path, body, status, param, words the message must hold)
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", ', 400, None, "malformed JSON"),
    ("/v1/completions", {"model": NAME, "prompt": [5] * CONTEXT}, 400, "prompt", "context"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", "greater than 0"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": -4}, 400, "max_tokens", "greater than 0"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": CONTEXT}, 400, "max_tokens", "context"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "Hi"}, 404, "model", "gpt-9"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "stream": "yes"}, 400, "stream", "boolean"),
    ("/v1/completions", {"model": NAME, "prompt": 42}, 400, "prompt", "string"),
    ("/v1/completions", {"model": NAME}, 400, "prompt", "required"),
    ("/v1/completions", {"model": NAME, "prompt": [10**9]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "n": 2}, 400, "n", "less than or equal to 1"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "string"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", "user"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400,
     "top_p", "greater than 0"),
]


def test_bad_requests_get_4xx_naming_the_field(served):
    for path, body, status, param, words in BAD_REQUESTS:
        got, reply = served.post(path, body)
        assert got == status, (body, reply)
        error = reply["error"]
        assert error["param"] == param, (body, error)
        assert words in error["message"], (body, error)
        if param is not None:
            assert error["message"].startswith(param) or param in error["message"]
        assert served.get("/health")[0] == 200
    # unknown fields are ignored; the server still answers
    status, reply = served.post("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2, "temperature": 0,
                                                    "frequency_penalty_v9": 1, "user": "me"})
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model="other", prompt="Hi")
    assert served.engine.pool.in_use == 0


def test_memory_refusals_get_503_and_the_server_keeps_serving(tiny, tokenizer):
    model, handle = tiny
    budget = handle.expected_kv_bytes(200)
    with _serve(tiny, tokenizer, kv_budget_gib=budget / 2**30, max_batch=1, queue_size=1,
                         queue_timeout=0.5) as served:
        pool = served.engine.pool
        # larger than the whole pool
        status, reply = served.post("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 400})
        assert status == 503 and reply["error"]["code"] == "kv_pool_too_small", reply
        assert "MiB" in reply["error"]["message"]
        # the one batch slot is taken: the next request waits, then times out; one more finds the queue full.
        # Each forward sleeps 20 ms so that the holder's 150 tokens take 3 s whatever the machine: the tiny model
        # alone can finish them within the waiter's 0.5 s queue timeout and hand it the slot.
        slow = model.register_forward_pre_hook(lambda *args: time.sleep(0.02))
        try:
            holder = served.client.completions.create(model=NAME, prompt="Hi", max_tokens=150, temperature=0,
                                                      stream=True)
            next(iter(holder))
            with ThreadPoolExecutor(1) as ex:
                waiter = ex.submit(served.post, "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2})
                assert wait_until(lambda: pool.waiting == 1)
                status, reply = served.post("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2})
                assert status == 503 and reply["error"]["code"] == "queue_full", reply
                status, reply = waiter.result(timeout=30)
                assert status == 503 and reply["error"]["code"] == "queue_timeout", reply
            holder.close()
        finally:
            slow.remove()
        assert wait_until(lambda: pool.in_use == 0 and pool.running == 0 and pool.waiting == 0)
        # the device running out of memory fails that request only
        scheduler = served.engine.scheduler

        def no_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        scheduler.new_cache = no_memory
        status, reply = served.post("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2})
        assert status == 503 and reply["error"]["code"] == "out_of_memory", reply
        scheduler.new_cache = handle.new_cache
        assert wait_until(lambda: pool.in_use == 0)
        # ... also in a decode step, after the first token (sampled from the prefill) was streamed
        forward, scheduler.decode_forward = scheduler.decode_forward, no_memory
        try:
            status, reply = served.post("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 4,
                                                            "temperature": 0})
            assert status == 503 and reply["error"]["code"] == "out_of_memory", reply
            stream = served.client.completions.create(model=NAME, prompt="Hi", max_tokens=4, temperature=0,
                                                      stream=True)
            chunks = iter(stream)
            next(chunks)
            with pytest.raises(openai.APIError, match="ran out of memory"):
                next(chunks)  # an OpenAI error event, then the stream ends
        finally:
            scheduler.decode_forward = forward
        assert wait_until(lambda: pool.in_use == 0 and pool.running == 0)
        assert complete(served.client, False, prompt="Hi", max_tokens=3, temperature=0)[1] == "length"
        assert served.get("/health")[0] == 200
        # a stopped worker: requests and the health check say so instead of hanging
        served.engine.scheduler.stop()
        status, reply = served.post("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2})
        assert status == 503 and reply["error"]["code"] == "worker_stopped", reply
        assert served.get("/health")[0] == 503


# ----------------------------------------------------------------------------------------- introspection
def test_models_health_and_metrics(served):
    assert [m.id for m in served.client.models.list().data] == [NAME]
    status, body = served.get("/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["kv_bytes_capacity"] == served.engine.pool.capacity
    assert served.engine.prefill_reserve == 0  # the streaming prefill keeps no prompt history
    complete(served.client, True, prompt="Count: one two three", max_tokens=4, temperature=0)
    status, text = served.get("/metrics")
    assert status == 200
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["duoattn_kv_bytes_capacity"] == served.engine.pool.capacity
    assert samples["duoattn_kv_bytes_in_use"] == 0 and samples["duoattn_queue_length"] == 0
    assert samples["duoattn_time_to_first_token_seconds_count"] >= 1
    assert samples["duoattn_inter_token_latency_seconds_count"] >= 3
    assert samples["duoattn_generation_tokens_total"] >= 4
    assert samples['duoattn_requests_total{endpoint="/v1/completions",status="200"}'] >= 1


# ------------------------------------------------------------------------------------------ embedded model
@pytest.mark.slow
def test_embedded_model_answers_a_passkey_prompt():
    from duoattn.eval.generation import GenerationSettings, generate_answer
    from duoattn.eval.passkey import passkey_sample
    from duoattn.serve.server import load_engine

    engine = load_engine(ServeConfig(prefill_chunk=256, kv_budget_gib=1.0))
    try:
        sample = passkey_sample(engine.tokenizer, 1024, depth=0.5, seed=20261129)
        expected, _ = generate_answer(engine.model, engine.tokenizer, sample.input_ids,
                                      GenerationSettings(max_new_tokens=8, prefill_chunk_size=256))
        with running_server(build_app(engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
            reply = client.completions.create(model=engine.served_name, prompt=sample.input_ids, max_tokens=8,
                                              temperature=0)
        answer = reply.choices[0].text
        assert sample.answer in answer, answer
        assert answer == expected
    finally:
        disable_duo_attention(engine.model)


# ------------------------------------------------------------------------------------------- pool and CLI
def test_pool_serves_waiters_in_order_and_forgets_those_that_leave():
    import asyncio

    from duoattn.serve.pool import KVPool, PoolRefusal

    async def scenario() -> list[str]:
        pool = KVPool(capacity=100, max_sequences=3, queue_size=2, timeout=5.0)
        order: list[str] = []
        await pool.acquire(60)

        async def wait(name: str, nbytes: int) -> None:
            await pool.acquire(nbytes)
            order.append(name)

        big = asyncio.create_task(wait("big", 70))  # head of the queue: does not fit beside the 60
        await asyncio.sleep(0)
        small = asyncio.create_task(wait("small", 10))  # fits now, but must not overtake the head
        await asyncio.sleep(0)
        assert pool.waiting == 2 and order == []
        with pytest.raises(PoolRefusal, match="capacity"):
            await pool.acquire(1)  # queue full
        with pytest.raises(PoolRefusal, match="holds"):
            await pool.acquire(101)  # never fits
        pool.release(60)
        await asyncio.gather(big, small)
        assert (pool.in_use, pool.running, pool.waiting) == (80, 2, 0)
        leaver = asyncio.create_task(pool.acquire(50))
        await asyncio.sleep(0)
        leaver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaver
        assert pool.waiting == 0
        pool.release(70), pool.release(10)
        assert (pool.in_use, pool.running) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["big", "small"]


def test_cli_builds_the_server_config(monkeypatch):
    import duoattn.serve.server as server
    from duoattn.cli import main

    seen: list[ServeConfig] = []
    monkeypatch.setattr(server, "serve", seen.append)
    assert main(["serve", "--sparsity", "0.75", "--kv-bits", "4", "--port", "8123", "--max-batch", "4",
                 "--kv-budget-gib", "2", "--queue-size", "3", "--queue-timeout", "1.5", "--prefill-chunk", "64"]) == 0
    config = seen[0]
    assert (config.model, config.pattern, config.host, config.port) == (None, None, "127.0.0.1", 8123)
    assert (config.sparsity, config.kv_bits, config.max_batch, config.kv_budget_gib) == (0.75, 4, 4, 2.0)
    assert (config.queue_size, config.queue_timeout, config.prefill_chunk) == (3, 1.5, 64)
    assert config.prefill == "streaming"
    assert main(["serve", "--prefill", "Window:128"]) == 0 and seen[1].prefill == "window:128"
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match="prefill must be streaming .default., full, or window:N"):
        ServeConfig(prefill="half")


def test_load_generator_reports_latencies(served, tmp_path):
    from duoattn.serve.load import LoadConfig, format_report, run_load

    report = run_load(LoadConfig(url=served.url, clients=3, requests=6, prompt_tokens=20, max_tokens=5,
                                 vocab=len(served.engine.tokenizer), deadline_s=60, out=str(tmp_path)))
    assert (report.completed, report.failed) == (6, 0), report.errors
    assert report.config["model"] == NAME
    assert 0 < report.generated_tokens <= 30 and report.tokens_per_s > 0
    assert 0 < report.ttft_s["p50"] <= report.ttft_s["max"]
    saved = json.loads((tmp_path / "load.json").read_text())
    assert saved["completed"] == 6 and "time to first token" in format_report(report)
