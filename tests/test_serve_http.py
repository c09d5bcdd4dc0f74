"""HTTP shapes of the OpenAI API that need no engine: a small fake engine client streams fixed
deltas (the end-to-end tests in test_serve_ray.py use the real engine)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from spin_ray.metrics.prometheus_sink import PrometheusSink
from spin_ray.models.byte_tokenizer import build_byte_tokenizer
from spin_ray.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from spin_ray.serve.engine_client import EngineRequest, EngineUnavailableError, ModelInfo
from spin_ray.serve.openai_api import API_KEY_ENV, ApiSettings, create_openai_app


class FakeEngine:
    """Streams the tokens "h", "i", "!" as three deltas, with logprobs when asked."""

    def __init__(self, down: str | None = None):
        self.requests: list[EngineRequest] = []
        self.closed: list[str] = []
        self.down = down
        """Why the engines cannot serve (None: they can)."""

    async def model_info(self) -> ModelInfo:
        if self.down is not None:
            raise EngineUnavailableError(self.down)
        return ModelInfo(max_model_len=64)

    async def unavailable_reason(self) -> str | None:
        return self.down

    async def generate(self, request: EngineRequest):
        self.requests.append(request)
        try:
            for i, ch in enumerate("hi!"):
                logprobs = None
                if request.params.logprobs is not None:
                    top = {ord("a") + k: -1.0 - k for k in range(request.params.logprobs)}
                    logprobs = [TokenLogprob(ord(ch), -0.5, top)]
                last = i == 2
                yield RequestOutput(
                    request_id=request.request_id,
                    prompt=None,
                    prompt_token_ids=request.prompt_token_ids,
                    outputs=[
                        CompletionOutput(
                            0, ch, [ord(ch)], "stop" if last else None, logprobs=logprobs
                        )
                    ],
                    finished=last,
                    metrics=RequestMetrics(0.0, None, None, None, i + 1),
                )
        finally:
            self.closed.append(request.request_id)


@pytest.fixture
def served():
    engine = FakeEngine()
    app = create_openai_app(
        engine,
        build_byte_tokenizer(),
        ApiSettings(served_model_name="m", max_body_bytes=1000),
    )
    with TestClient(app) as client:
        yield engine, client


def _events(text: str) -> list:
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def test_streamed_chat_chunks_are_openai_s(served):
    engine, client = served
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "yo"}],
        "stream": True,
        "logprobs": True,
        "top_logprobs": 2,
        "max_completion_tokens": 3,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    chunks = _events(response.text)
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 5
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in chunks[1:4]] == [
        {"content": "h"},
        {"content": "i"},
        {"content": "!"},
    ]
    assert chunks[4]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    entry = chunks[1]["choices"][0]["logprobs"]["content"][0]
    assert entry["token"] == "h" and entry["bytes"] == [ord("h")] and entry["logprob"] == -0.5
    assert [t["token"] for t in entry["top_logprobs"]] == ["a", "b"]
    assert "usage" not in chunks[0]  # only with stream_options.include_usage
    assert engine.requests[0].params.max_tokens == 3 and engine.requests[0].params.logprobs == 2


def test_completion_logprobs_and_text_offsets(served):
    _, client = served
    body = {"model": "m", "prompt": "ab", "logprobs": 1, "max_tokens": 3}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == "hi!"
    assert choice["logprobs"] == {
        "tokens": ["h", "i", "!"],
        "token_logprobs": [-0.5] * 3,
        "top_logprobs": [{"a": -1.0}] * 3,
        "text_offset": [0, 1, 2],
    }


def test_chunked_body_over_the_limit_gets_413(served):
    _, client = served

    def body():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "m", "prompt": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    response = client.post(
        "/v1/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "k")
    app = create_openai_app(
        FakeEngine(),
        build_byte_tokenizer(),
        ApiSettings(served_model_name="m"),
    )
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
        assert client.get("/health").status_code == 200  # health needs no key


def test_default_max_tokens_fill_the_context(served):
    engine, client = served
    messages = [{"role": "user", "content": "yo"}]
    client.post("/v1/chat/completions", json={"model": "m", "messages": messages})
    prompt = len(engine.requests[0].prompt_token_ids)
    assert engine.requests[0].params.max_tokens == 64 - prompt  # chat: the rest of the context
    client.post("/v1/completions", json={"model": "m", "prompt": "ab"})
    assert engine.requests[1].params.max_tokens == 16  # completions: OpenAI's default


def test_the_official_client_reads_these_shapes(served):
    """The same responses through the `openai` client (TestClient is an httpx.Client)."""
    import openai

    _, http = served
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "yo"}], stream=True, max_tokens=3,
            logprobs=True, top_logprobs=2, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi!"
    assert chunks[1].choices[0].logprobs.content[0].top_logprobs[1].token == "b"
    assert chunks[-1].usage.completion_tokens == 3
    completion = client.completions.create(model="m", prompt="ab", max_tokens=3, logprobs=1)
    assert completion.choices[0].logprobs.text_offset == [0, 1, 2]
    assert completion.choices[0].finish_reason == "stop" and completion.usage.completion_tokens == 3


def test_responses_are_counted_by_route_and_status():
    registry = CollectorRegistry()
    app = create_openai_app(
        FakeEngine(),
        build_byte_tokenizer(),
        ApiSettings(served_model_name="m", max_body_bytes=1000),
        PrometheusSink(registry),
    )

    def count(route: str, status: int) -> float:
        labels = {"model": "m", "route": route, "status": str(status)}
        return registry.get_sample_value("spin_ray_http_responses_total", labels) or 0.0

    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json={"model": "m", "prompt": "yo", "max_tokens": 3})
        assert ok.status_code == 200
        bad = client.post("/v1/completions", json={"model": "m", "prompt": "yo", "max_tokens": 0})
        assert bad.status_code == 400
        assert client.post("/v1/completions", content=b"x" * 2000).status_code == 413
        for path in ("/nope", "/admin/../x"):  # not routes: one series for all of them
            assert client.get(path).status_code == 404
    assert count("/health", 200) == 1
    assert count("/v1/completions", 200) == 1
    assert count("/v1/completions", 400) == 1
    assert count("/v1/completions", 413) == 1  # BodyLimit's answer is counted too
    assert count("other", 404) == 2
    # the statuses the API answers exist from the start, at zero (rates see a first error)
    labels = {"model": "m", "route": "/v1/chat/completions", "status": "500"}
    assert registry.get_sample_value("spin_ray_http_responses_total", labels) == 0.0


class FailingEngine(FakeEngine):
    """Streams one delta, then its replica dies (`fail_after=1`), or fails at once with an
    error the server does not expect (`fail_after=0`)."""

    def __init__(self, fail_after: int):
        super().__init__()
        self.fail_after = fail_after

    async def generate(self, request: EngineRequest):
        if self.fail_after == 0:
            raise RuntimeError("a bug")
        async for output in super().generate(request):
            yield dataclasses.replace(output, finished=False)
            raise EngineUnavailableError("the engine replica failed: it died")


def _app(engine, **settings) -> TestClient:
    settings = {"served_model_name": "m", **settings}
    app = create_openai_app(engine, build_byte_tokenizer(), ApiSettings(**settings))
    return TestClient(app, raise_server_exceptions=False)  # what a client would get


def test_a_stream_cut_by_a_dead_replica_ends_with_an_error_event_and_done():
    body = {"model": "m", "prompt": "yo", "max_tokens": 3, "stream": True}
    with _app(FailingEngine(fail_after=1)) as client:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200
        events = _events(response.text)
        assert events[0]["choices"][0]["text"] == "h"
        assert events[-1]["error"]["code"] == "engine_unavailable"
        assert "died" in events[-1]["error"]["message"]
        # not streamed: the same failure is a 503 with Retry-After
        failed = client.post("/v1/completions", json={**body, "stream": False})
        assert failed.status_code == 503 and failed.headers["Retry-After"] == "1"
        assert failed.json()["error"]["code"] == "engine_unavailable"


def test_an_unexpected_error_is_a_500_in_openai_form():
    with _app(FailingEngine(fail_after=0)) as client:
        response = client.post("/v1/completions", json={"model": "m", "prompt": "yo"})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


def test_engines_down_give_503_with_the_reason_at_once():
    reason = "the engine deployment is DEPLOY_FAILED: model: '/x' is not an existing folder"
    with _app(FakeEngine(down=reason)) as client:
        for method, path in (("GET", "/health"), ("GET", "/v1/models"),
                             ("POST", "/v1/completions")):  # fmt: skip
            response = client.request(method, path, json={"model": "m", "prompt": "hi"})
            assert response.status_code == 503, path
            assert response.json()["error"]["message"].startswith(reason), path


def test_docs_are_closed_when_an_api_key_is_set():
    with _app(FakeEngine()) as client:
        assert client.get("/openapi.json").status_code == 200
    with _app(FakeEngine(), api_key="k") as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            response = client.get(path)
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_a_body_slower_than_the_timeout_gets_408():
    """BodyLimit with a client that sends part of its body and then nothing."""
    app = create_openai_app(
        FakeEngine(), build_byte_tokenizer(), ApiSettings(served_model_name="m", body_timeout_s=0.2)
    )
    sent: list[dict] = []

    async def receive():
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": b'{"model"', "more_body": True}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "headers": [(b"content-length", b"100")], "http_version": "1.1",
        "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": "",
    }  # fmt: skip
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=5))
    start = next(m for m in sent if m.get("type") == "http.response.start")
    body = next(m for m in sent if m.get("type") == "http.response.body")
    assert start["status"] == 408
    assert json.loads(body["body"])["error"]["code"] == "request_timeout"
