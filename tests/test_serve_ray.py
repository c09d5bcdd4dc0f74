"""The Ray Serve application end to end on a local Ray (CPU): real Ray, real engines (spin-tiny),
the official `openai` client and raw HTTP.

One application serves every test: two engine replicas, one per logical GPU, each with a KV
cache of 256 pages × 16 tokens, so that a long request's working set fits only on a replica
that does not already hold one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from spin_ray import LLM, SamplingParams
from spin_ray.serve import build_app
from spin_ray.serve.placement import expected_output_tokens
from spin_ray.serve.replica_stats import engine_replica_stats

pytestmark = pytest.mark.ray  # starts a local Ray cluster; -m "not ray" skips

APP = "spin-test"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PAGE = 16
NUM_PAGES = 256
MAX_MODEL_LEN = 4096
MAX_ONGOING = 4
MAX_QUEUED = 4
MAX_BODY = 200_000
STATS_PERIOD_S = 0.2

ARGS = {
    "model": "spin-tiny",
    "api_key": KEY,
    "max_body_bytes": MAX_BODY,
    "retry_after_s": 2,
    "engine_args": {
        "device": "cpu",
        "max_model_len": MAX_MODEL_LEN,
        "num_pages": NUM_PAGES,
        "page_size": PAGE,
        "max_num_seqs": 8,
    },
    "engine": {
        "num_gpus": 1,  # logical GPUs: one replica per GPU
        "num_cpus": 0,
        "num_replicas": 2,
        "max_ongoing_requests": MAX_ONGOING,
        "max_queued_requests": MAX_QUEUED,
        "routing_stats_period_s": STATS_PERIOD_S,
        "stale_after_s": 2.0,
    },
    "ingress": {"num_cpus": 0},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url():
    # a cluster of its own, never one another process (serve run) left running
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ARGS), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)


def _wait_idle(timeout_s: float = 60.0) -> dict:
    """Wait until no replica holds a request or a page, and until the router has had their
    idle reports (a few stats periods); return the stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine_replica_stats(APP)
        busy = sum(s.num_running + s.num_waiting + s.hbm_pages_used for s in stats.values())
        if len(stats) == 2 and busy == 0:
            time.sleep(3 * STATS_PERIOD_S)
            return stats
        assert time.monotonic() < deadline, f"replicas did not go idle: {stats}"
        time.sleep(0.1)


def _wait_reported(condition, timeout_s: float = 30.0) -> None:
    """Wait until the replicas' stats satisfy `condition` (called with their values), then a
    few stats periods more, so that the router has been handed such a report too."""
    deadline = time.monotonic() + timeout_s
    while not condition(list(engine_replica_stats(APP).values())):
        assert time.monotonic() < deadline, "the replicas never reported it"
        time.sleep(0.05)
    time.sleep(3 * STATS_PERIOD_S)


@contextlib.contextmanager
def _streams():
    """Open completion streams with `open_stream(base_url, body)`, each read up to its first
    chunk; they stay open (a dropped line iterator would close its connection) until exit,
    when the client disconnects from all of them."""
    held = []
    lock = threading.Lock()  # open_stream may be called from several threads at once
    with contextlib.ExitStack() as stack, httpx.Client(timeout=120) as http:

        def open_stream(base_url: str, body: dict):
            request = http.stream("POST", f"{base_url}/v1/completions", json=body, headers=AUTH)
            response = request.__enter__()
            with lock:
                stack.push(request.__exit__)
            assert response.status_code == 200, response.read()
            lines = response.iter_lines()
            with lock:
                held.append(lines)
            first = next(line for line in lines if line.startswith("data: "))
            return lines, json.loads(first.removeprefix("data: "))

        yield open_stream


def _long_body(prompt_tokens: int, max_tokens: int) -> dict:
    # spin-tiny's tokenizer is byte-level: one token per byte plus BOS.
    return {
        "model": "spin-tiny",
        "prompt": "a" * (prompt_tokens - 1),
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }


# ------------------------------------------------------------------ OpenAI client


def test_models_completion_and_streamed_chat(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["spin-tiny"]

    completion = client.completions.create(
        model="spin-tiny",
        prompt="Hello",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == len("Hello") + 1  # bytes + BOS

    # Greedy is deterministic: the same request gives the same text.
    again = client.completions.create(
        model="spin-tiny",
        prompt="Hello",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert again.choices[0].text == completion.choices[0].text

    chunks = list(
        client.chat.completions.create(
            model="spin-tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    whole = client.chat.completions.create(
        model="spin-tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].message.content == streamed
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_sse_framing_is_openai_s(http):
    body = {
        "model": "spin-tiny",
        "prompt": "Hi",
        "max_tokens": 3,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    response = http.post("/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert [p["usage"] for p in payloads[:-1]] == [None] * (len(payloads) - 1)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"


def test_logprobs(client):
    chat = client.chat.completions.create(
        model="spin-tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens > 0
    for entry in content:  # greedy (EOS allowed): each token is its position's most likely
        top = sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(top) == 3 and entry.logprob == pytest.approx(top[0]) and top[0] < 0

    completion = client.completions.create(
        model="spin-tiny",
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    logprobs = completion.choices[0].logprobs
    # the same request offline, in this process: the served figures are the engine's
    offline = (
        LLM("spin-tiny", **ARGS["engine_args"])
        .generate(
            ["Hello"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
        )[0]
        .outputs[0]
    )
    assert completion.choices[0].text == offline.text
    assert logprobs.token_logprobs == pytest.approx([t.logprob for t in offline.logprobs], abs=1e-4)
    for served, expected in zip(logprobs.top_logprobs, offline.logprobs, strict=True):
        # keyed by token text: ids that decode alike (e.g. to U+FFFD) share one entry
        for value in served.values():
            assert any(value == pytest.approx(v, abs=1e-4) for v in expected.top.values())


# ------------------------------------------------------------------ errors


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
        ("/v1/completions", {"prompt": "x", "bogus": 1}, "bogus"),
        ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
        ("/v1/completions", {"prompt": "x", "sparse": "quest"}, "sparse"),
        ("/v1/completions", {"prompt": "x", "token_budget": 512}, "token_budget"),
        ("/v1/completions", {"prompt": [1] * MAX_MODEL_LEN}, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
        ("/v1/completions", {"prompt": [5, 10**6]}, "prompt_token_ids"),  # found by the engine
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ],
)
def test_invalid_fields_get_400_naming_the_field(http, path, body, param):
    error = _error(http.post(path, json={"model": "spin-tiny", **body}, headers=AUTH), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_statuses(http, client):
    body = {"model": "nope", "prompt": "x"}
    assert _error(http.post("/v1/completions", json=body, headers=AUTH), 404)["param"] == "model"

    huge = {"model": "spin-tiny", "prompt": "x" * (MAX_BODY + 1)}
    _error(http.post("/v1/completions", json=huge, headers=AUTH), 413)

    _error(http.get("/v1/models"), 401)
    _error(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert http.get("/health").status_code == 200

    response = http.post("/v1/completions", content=b"{not json", headers=AUTH)
    _error(response, 400)

    # ... and the server keeps serving.
    assert client.completions.create(model="spin-tiny", prompt="ok", max_tokens=2).choices


def test_overload_gets_503_with_retry_after(base_url, http):
    _wait_idle()
    short = {"model": "spin-tiny", "prompt": "x", "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(MAX_QUEUED) as pool:
        with _streams() as open_stream:
            for _ in range(2 * MAX_ONGOING):  # every slot of both replicas taken
                open_stream(base_url, _long_body(4, 300))
            # these wait in the ingress's queue (max_queued_requests) ...
            queued = [pool.submit(_status, base_url, short) for _ in range(MAX_QUEUED)]
            time.sleep(1.0)
            # ... and the next one is turned away.
            response = http.post("/v1/completions", json=short, headers=AUTH)
            error = _error(response, 503)
            assert error["code"] == "overloaded"
            assert response.headers["retry-after"] == "2"
        # The streams are gone: the queued requests run, the server keeps serving.
        assert [q.result() for q in queued] == [200] * MAX_QUEUED
    assert http.post("/v1/completions", json=short, headers=AUTH).status_code == 200


def _status(base_url: str, body: dict) -> int:
    return httpx.post(
        f"{base_url}/v1/completions", json=body, headers=AUTH, timeout=120
    ).status_code


# ------------------------------------------------------------------ disconnect


def test_client_disconnect_aborts_the_request_and_frees_its_pages(base_url):
    _wait_idle()
    aborted = sum(s.requests_aborted for s in engine_replica_stats(APP).values())
    with _streams() as open_stream:
        lines, _ = open_stream(base_url, _long_body(200, 3000))
        for _ in range(3):
            next(lines)
        held = engine_replica_stats(APP)
        assert sum(s.hbm_pages_used for s in held.values()) > 0
        assert sum(s.num_running for s in held.values()) == 1
    deadline = time.monotonic() + 120  # a guard against hanging, not a speed requirement
    while True:
        stats = engine_replica_stats(APP)
        if sum(s.hbm_pages_used + s.num_running for s in stats.values()) == 0:
            break
        assert time.monotonic() < deadline, f"pages still held: {stats}"
        time.sleep(0.02)
    # gone because it was aborted, not because its 3000 tokens ran out
    assert sum(s.requests_aborted for s in stats.values()) == aborted + 1


# ------------------------------------------------------------------ router


def _long_and_other(stats: dict, pages: int) -> tuple[str, str]:
    """(the one replica with at least `pages` HBM pages committed, the other one); a replica
    commits what its requests are predicted to need, or more once their buffers have grown."""
    [replica] = [rid for rid, s in stats.items() if s.hbm_pages_committed >= pages]
    [other] = set(stats) - {replica}
    return replica, other


def test_router_places_a_long_request_where_its_working_set_fits(base_url):
    stats = _wait_idle()
    # A 2,400-token prompt that may generate 1,500: its working set is the prompt and the
    # output the replicas expect (the p90 of what they have seen, at most 1,500), over 150 of
    # 256 pages, so one per replica at most.
    expected = expected_output_tokens(stats.values(), time.time(), 2.0, default=1024)
    long_pages = -(-(2400 + min(1500, expected)) // PAGE)
    assert long_pages > NUM_PAGES // 2
    with _streams() as open_stream:
        open_stream(base_url, _long_body(2400, 1500))
        # Let the router see the long request in a report first (and not only as its own
        # pick): once reported, it must weigh as much as when it was only sent.
        _wait_reported(lambda stats: any(s.hbm_pages_committed >= long_pages for s in stats))
        # Short requests (25 pages each), each reported before the next, until the other
        # replica runs more of them than x runs requests: least-loaded routing would then
        # pick x, which cannot hold a second long request. (They go to y when the router sees
        # both replicas' fresh reports; a report that came late on a loaded machine can send
        # one to x, so the test counts rather than assumes.)
        for _ in range(4):
            before = engine_replica_stats(APP)
            x, y = _long_and_other(before, long_pages)
            if before[y].num_running > before[x].num_running:
                break
            running = sum(s.num_running for s in before.values())
            open_stream(base_url, _long_body(4, 396))
            _wait_reported(lambda stats, n=running: sum(s.num_running for s in stats) == n + 1)
        before = engine_replica_stats(APP)
        x, y = _long_and_other(before, long_pages)
        assert before[y].num_running > before[x].num_running
        assert before[y].hbm_pages_committed + long_pages <= NUM_PAGES  # y can hold it

        open_stream(base_url, _long_body(2400, 1500))
        after = engine_replica_stats(APP)
        assert after[x].num_running == before[x].num_running
        assert after[y].num_running == before[y].num_running + 1
        assert after[y].hbm_pages_committed >= before[y].hbm_pages_committed + long_pages


def test_router_balances_a_burst_of_requests_of_equal_fit(base_url):
    _wait_idle()
    with _streams() as open_stream, concurrent.futures.ThreadPoolExecutor(4) as pool:
        # All at once: before any replica reports them, the router counts its own picks.
        opened = [pool.submit(open_stream, base_url, _long_body(8, 300)) for _ in range(4)]
        for future in opened:
            future.result()
        stats = engine_replica_stats(APP)
        assert sorted(s.num_running for s in stats.values()) == [2, 2]


def test_router_routes_around_a_dead_replica(client):
    stats = _wait_idle()
    victim = sorted(stats)[0]
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#SpinEngine#{victim}", namespace="serve")
    ray.kill(actor, no_restart=True)
    for i in range(4):
        completion = client.completions.create(
            model="spin-tiny",
            prompt=f"after {i}",
            max_tokens=2,
        )
        assert completion.choices[0].finish_reason in ("length", "stop")
