"""Hostile input against the real Ray Serve application (spin-tiny on the CPU): every case gets
one well-formed answer within its deadline, in OpenAI form (an error JSON with the right
status, or a complete answer / a stream ending in `[DONE]`), and the server answers /health
after each. Raw-socket cases cover lying Content-Lengths, trickled bodies, idle connections and
chunked bodies."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

import httpx
import pytest
import ray
from ray import serve

from spin_ray.serve import build_app
from spin_ray.serve.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

pytestmark = pytest.mark.ray

APP = "spin-hostile"
KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 1024
MAX_BODY = 100_000
BODY_TIMEOUT_S = 1.0
ARGS = {
    "model": "spin-tiny",
    "api_key": KEY,
    "max_body_bytes": MAX_BODY,
    "body_timeout_s": BODY_TIMEOUT_S,
    "engine_args": {"device": "cpu", "max_model_len": MAX_MODEL_LEN, "num_pages": 512},
    "engine": {"num_gpus": 0, "num_cpus": 0, "num_replicas": 1},
    "ingress": {"num_cpus": 0},
}


@pytest.fixture(scope="module")
def server():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ARGS), name=APP, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, port
    finally:
        serve.shutdown()
        ray.shutdown()


def _healthy(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200


def _openai_error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "server_error")
    return error


# ------------------------------------------------------------------ JSON cases


@dataclass(frozen=True)
class Case:
    body: object
    """A dict (sent as JSON), or raw bytes."""
    statuses: tuple[int, ...]
    path: str = "/v1/completions"
    method: str = "POST"
    headers: dict = field(default_factory=lambda: dict(AUTH))
    param: str | None = None
    """The field the error names, where it names one."""
    deadline_s: float = 10.0


def completion(**fields) -> dict:
    return {"model": "spin-tiny", "prompt": "hello", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {
        "model": "spin-tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        **fields,
    }


BAD = (400,)
CASES = {
    # prompts
    "prompt-empty-list": Case(completion(prompt=[]), BAD, param="prompt"),
    "prompt-empty-nested": Case(completion(prompt=[[]]), BAD, param="prompt"),
    "prompt-empty-string": Case(completion(prompt=""), BAD, param="prompt"),
    "prompt-list-of-empty-string": Case(completion(prompt=[""]), BAD, param="prompt"),
    "prompt-two-texts": Case(completion(prompt=["a", "b"]), BAD, param="prompt"),
    "prompt-two-token-lists": Case(completion(prompt=[[1, 2], [3]]), BAD, param="prompt"),
    "prompt-negative-token": Case(completion(prompt=[-1]), BAD),
    "prompt-token-past-vocab": Case(completion(prompt=[10**9]), BAD),
    "prompt-float-token": Case(completion(prompt=[1.5]), BAD, param="prompt"),
    "prompt-mixed-list": Case(completion(prompt=["x", 1]), BAD, param="prompt"),
    "prompt-bool": Case(completion(prompt=True), BAD, param="prompt"),
    "prompt-null": Case(completion(prompt=None), BAD, param="prompt"),
    "prompt-object": Case(completion(prompt={"a": 1}), BAD, param="prompt"),
    "prompt-lone-surrogate": Case(completion(prompt="a\ud800b"), BAD, param="prompt"),
    "prompt-lone-low-surrogate": Case(completion(prompt="\udfff"), BAD, param="prompt"),
    "prompt-nul-char": Case(completion(prompt="a\u0000b"), (200,)),
    "prompt-emoji-and-rtl": Case(completion(prompt="héllo 👋 مرحبا"), (200,)),
    "prompt-over-the-character-bound": Case(
        completion(prompt="a" * 90_000), BAD, param="prompt", deadline_s=3.0
    ),
    "prompt-over-the-context": Case(completion(prompt="a" * (MAX_MODEL_LEN + 10)), BAD),
    "prompt-missing": Case({"model": "spin-tiny"}, BAD, param="prompt"),
    # sampling fields
    "max-tokens-zero": Case(completion(max_tokens=0), BAD, param="max_tokens"),
    "max-tokens-negative": Case(completion(max_tokens=-1), BAD, param="max_tokens"),
    "max-tokens-float": Case(completion(max_tokens=1.5), BAD, param="max_tokens"),
    "max-tokens-huge": Case(completion(max_tokens=10**12), BAD, param="max_tokens"),
    "max-tokens-past-the-context": Case(
        completion(max_tokens=MAX_MODEL_LEN), BAD, param="max_tokens"
    ),
    "max-tokens-numeric-string": Case(completion(max_tokens="2"), (200,)),
    "max-tokens-word": Case(completion(max_tokens="two"), BAD, param="max_tokens"),
    "temperature-negative": Case(completion(temperature=-0.1), BAD, param="temperature"),
    "temperature-too-high": Case(completion(temperature=2.5), BAD, param="temperature"),
    "temperature-word": Case(completion(temperature="hot"), BAD, param="temperature"),
    "top-p-zero": Case(completion(top_p=0), BAD, param="top_p"),
    "top-p-over-one": Case(completion(top_p=1.1), BAD, param="top_p"),
    "top-k-below-minus-one": Case(completion(top_k=-2), BAD, param="top_k"),
    "min-p-over-one": Case(completion(min_p=1.5), BAD, param="min_p"),
    "n-two": Case(completion(n=2), BAD, param="n"),
    "presence-penalty": Case(completion(presence_penalty=1.0), BAD, param="presence_penalty"),
    "frequency-penalty": Case(completion(frequency_penalty=1.0), BAD, param="frequency_penalty"),
    "too-many-stops": Case(completion(stop=["x"] * (MAX_STOP_STRINGS + 1)), BAD, param="stop"),
    "long-stop": Case(completion(stop="y" * (MAX_STOP_CHARS + 1)), BAD, param="stop"),
    "ten-thousand-stops": Case(completion(stop=["st"] * 10_000), BAD, param="stop", deadline_s=3.0),
    "empty-stop": Case(completion(stop=[""]), BAD, param="stop"),
    "stop-number": Case(completion(stop=5), BAD, param="stop"),
    "too-many-stop-token-ids": Case(
        completion(stop_token_ids=[1] * (MAX_STOP_TOKEN_IDS + 1)), BAD, param="stop_token_ids"
    ),
    "stop-token-id-word": Case(completion(stop_token_ids=["a"]), BAD, param="stop_token_ids"),
    "seed-word": Case(completion(seed="x"), BAD, param="seed"),
    "seed-past-64-bits": Case(completion(seed=2**70), BAD, param="seed"),
    "logprobs-21": Case(completion(logprobs=21), BAD, param="logprobs"),
    "logprobs-negative": Case(completion(logprobs=-1), BAD, param="logprobs"),
    "echo": Case(completion(echo=True), BAD, param="echo"),
    "suffix": Case(completion(suffix="x"), BAD, param="suffix"),
    "best-of-two": Case(completion(best_of=2), BAD, param="best_of"),
    "unknown-field": Case(completion(foo=1), BAD, param="foo"),
    "per-request-sparse": Case(completion(sparse="quest"), BAD, param="sparse"),
    "per-request-token-budget": Case(completion(token_budget=0.5), BAD, param="token_budget"),
    "model-missing": Case({"prompt": "hi"}, BAD, param="model"),
    "model-unknown": Case(completion(model="gpt-5"), (404,), param="model"),
    "model-number": Case(completion(model=123), BAD, param="model"),
    "stream-word-yes": Case(completion(stream="yes"), (200,)),
    "stream-options-without-stream": Case(
        completion(stream_options={"include_usage": True}), BAD, param="stream_options"
    ),
    "stream-options-bad": Case(completion(stream=True, stream_options={"include_usage": "x"}), BAD),
    "user-number": Case(completion(user=1), BAD, param="user"),
    "nan-temperature": Case(b'{"model":"spin-tiny","prompt":"hi","temperature":NaN}', BAD),
    "infinite-max-tokens": Case(b'{"model":"spin-tiny","prompt":"hi","max_tokens":1e400}', BAD),
    # chat
    "chat-no-messages": Case(chat(messages=[]), BAD, "/v1/chat/completions", param="messages"),
    "chat-messages-missing": Case(
        {"model": "spin-tiny"}, BAD, "/v1/chat/completions", param="messages"
    ),
    "chat-unknown-role": Case(
        chat(messages=[{"role": "robot", "content": "hi"}]),
        BAD,
        "/v1/chat/completions",
        param="messages",
    ),
    "chat-no-role": Case(
        chat(messages=[{"content": "hi"}]), BAD, "/v1/chat/completions", param="messages"
    ),
    "chat-image-part": Case(
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
        BAD,
        "/v1/chat/completions",
    ),
    "chat-number-content": Case(
        chat(messages=[{"role": "user", "content": 12}]),
        BAD,
        "/v1/chat/completions",
        param="messages",
    ),
    "chat-thousand-messages": Case(
        chat(messages=[{"role": "user", "content": "hi"}] * 1000),
        BAD,
        "/v1/chat/completions",
        deadline_s=10.0,
    ),
    "chat-lone-surrogate": Case(
        chat(messages=[{"role": "user", "content": "\ud83d"}]),
        BAD,
        "/v1/chat/completions",
        param="messages",
    ),
    "chat-max-completion-tokens-zero": Case(
        chat(max_completion_tokens=0), BAD, "/v1/chat/completions"
    ),
    "chat-top-logprobs-without-logprobs": Case(
        chat(top_logprobs=2), BAD, "/v1/chat/completions", param="top_logprobs"
    ),
    "chat-top-logprobs-21": Case(chat(logprobs=True, top_logprobs=21), BAD, "/v1/chat/completions"),
    "chat-json-response-format": Case(
        chat(response_format={"type": "json_object"}), BAD, "/v1/chat/completions"
    ),
    "chat-ok": Case(chat(), (200,), "/v1/chat/completions"),
    "chat-streamed-ok": Case(chat(stream=True), (200,), "/v1/chat/completions"),
    # bodies
    "body-not-json": Case(b"{", BAD),
    "body-json-array": Case(b"[]", BAD),
    "body-json-string": Case(b'"x"', BAD),
    "body-empty": Case(b"", BAD),
    "body-invalid-utf8": Case(b'{"model":"spin-tiny\xff","prompt":"hi"}', BAD),
    "body-deeply-nested": Case(b"[" * 20_000, BAD),
    "body-nested-objects": Case(b'{"a":' * 5_000 + b"1" + b"}" * 5_000, BAD),
    "body-too-large": Case(completion(prompt="a" * MAX_BODY), (413,)),
    "body-text-plain": Case(
        b'{"model":"spin-tiny","prompt":"hi"}', BAD, headers={**AUTH, "Content-Type": "text/plain"}
    ),
    "body-duplicate-keys": Case(
        b'{"model":"spin-tiny","prompt":"a","prompt":"b","max_tokens":2}', (200,)
    ),
    # authentication
    "auth-missing": Case(completion(), (401,), headers={}),
    "auth-bearer-only": Case(completion(), (401,), headers={"Authorization": "Bearer"}),
    "auth-lowercase-scheme": Case(completion(), (401,), headers={"Authorization": f"bearer {KEY}"}),
    "auth-basic": Case(completion(), (401,), headers={"Authorization": "Basic aGk6aGk="}),
    "auth-wrong-key": Case(completion(), (401,), headers={"Authorization": "Bearer nope"}),
    "auth-double-space": Case(completion(), (401,), headers={"Authorization": f"Bearer  {KEY}"}),
    "auth-key-prefix": Case(completion(), (401,), headers={"Authorization": f"Bearer {KEY[:-1]}"}),
    "many-junk-headers": Case(
        completion(), (200,), headers={**AUTH, **{f"X-Junk-{i}": "x" * 100 for i in range(50)}}
    ),
    # routes and methods
    "get-completions": Case(None, (405,), method="GET"),
    "post-models": Case({}, (405,), "/v1/models"),
    "unknown-route": Case(None, (404,), "/v2/completions", method="GET"),
    "docs-closed-with-a-key": Case(None, (404,), "/docs", method="GET"),
    "openapi-closed-with-a-key": Case(None, (404,), "/openapi.json", method="GET"),
    "dot-dot-path": Case(None, (404,), "/v1/../../etc/passwd", method="GET"),
    "long-path": Case(None, (404,), "/" + "a" * 4000, method="GET"),
    "options": Case(None, (405,), method="OPTIONS"),
    "models-with-junk-query": Case(None, (200,), "/v1/models?x=%ff&y=" + "z" * 1000, method="GET"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_request_gets_one_openai_answer_in_time(name, server):
    client, _ = server
    case = CASES[name]
    kwargs = {"headers": case.headers}
    if case.body is not None:  # JSON with \u escapes: lone surrogates travel as JSON allows
        body = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
        kwargs["content"] = body
        kwargs["headers"] = {"Content-Type": "application/json", **case.headers}
    started = time.monotonic()
    response = client.request(case.method, case.path, **kwargs)
    elapsed = time.monotonic() - started
    assert response.status_code in case.statuses, response.text[:300]
    assert elapsed < case.deadline_s, f"{elapsed:.1f} s"
    if response.status_code >= 400:
        error = _openai_error(response)
        if case.param is not None:
            assert error["param"] == case.param, error
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
    elif case.method == "POST":
        assert response.json()["choices"]
    _healthy(client)


# ------------------------------------------------------------------ raw sockets


def _raw(port: int, data: bytes, read_timeout_s: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _request(path: str, body: bytes, length: int | None = None, extra: bytes = b"") -> bytes:
    length = len(body) if length is None else length
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


def test_a_body_shorter_than_its_content_length_gets_408_in_time(server):
    client, port = server
    started = time.monotonic()
    answer = _raw(port, _request("/v1/completions", b'{"model":', length=500))
    assert _status(answer) == 408
    assert time.monotonic() - started < BODY_TIMEOUT_S + 5
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    _healthy(client)


def test_a_trickled_body_gets_408_and_others_are_served_meanwhile(server):
    client, port = server
    body = json.dumps(completion()).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(_request("/v1/completions", b"", length=len(body)))
        try:
            for byte in body[:8]:  # one byte every 0.4 s: past the body timeout
                s.sendall(bytes([byte]))
                _healthy(client)  # the ingress keeps answering
                time.sleep(0.4)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed while the client was still sending
        answer = s.recv(65536)
    assert _status(answer) == 408


def test_content_length_over_the_limit_gets_413_at_once(server):
    client, port = server
    answer = _raw(port, _request("/v1/completions", b"{}", length=MAX_BODY * 10))
    assert _status(answer) == 413
    _healthy(client)


def test_a_chunked_body_is_read(server):
    client, port = server
    body = json.dumps(completion()).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunks = (
        b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:10], body[10:]))
        + b"0\r\n\r\n"
    )
    answer = _raw(port, head + chunks)
    assert _status(answer) == 200
    _healthy(client)


def test_idle_connections_do_not_block_the_server(server):
    client, port = server
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        started = time.monotonic()
        response = client.post("/v1/completions", json=completion(), headers=AUTH)
        assert response.status_code == 200 and time.monotonic() - started < 10
        _healthy(client)
    finally:
        for s in idle:
            s.close()


def test_a_large_prompt_does_not_stall_health(server):
    """Tokenizing runs off the event loop: /health answers while a long prompt is handled."""
    client, _ = server
    with httpx.Client(base_url=client.base_url, timeout=60) as other:
        big = completion(prompt="word " * 19_000)  # under the body limit, over the context
        started = time.monotonic()
        response = other.post("/v1/completions", json=big, headers=AUTH)
        assert response.status_code == 400 and time.monotonic() - started < 5
        assert _openai_error(response)["code"] == "context_length_exceeded"
    _healthy(client)


def test_a_dropped_stream_leaves_the_server_serving(server):
    client, _ = server
    body = completion(prompt="hello", max_tokens=200, stream=True, ignore_eos=True)
    with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))
    # closed after the first chunk: the request is aborted; the next one is served
    assert client.post("/v1/completions", json=completion(), headers=AUTH).status_code == 200
    _healthy(client)
