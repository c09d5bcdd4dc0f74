"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions,
/v1/chat/completions (plain JSON or server-sent events) and /health.

The app tokenizes (and applies the chat template), checks the request against the model's
context, then streams `RequestOutput` deltas from an `EngineClient` into OpenAI's shapes.
Errors are OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from spin_ray.metrics.sink import MetricSink
from spin_ray.outputs import RequestOutput, TokenLogprob
from spin_ray.serve.engine_client import (
    EngineClient,
    EngineOverloadedError,
    EngineRequest,
    EngineUnavailableError,
    ModelInfo,
)
from spin_ray.serve.http_metrics import ResponseCounter
from spin_ray.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    FieldError,
    ModelCard,
    ModelList,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
    new_id,
)

API_KEY_ENV = "SPIN_RAY_API_KEY"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiSettings:
    """HTTP-level settings of the OpenAI server."""

    served_model_name: str
    """The model id clients send and /v1/models lists."""
    api_key: str | None = None
    """If set, every /v1 request needs `Authorization: Bearer <api_key>`; None reads
    $SPIN_RAY_API_KEY, and no key there means no check."""
    max_body_bytes: int = 32 * 2**20
    """Largest request body accepted; larger gets 413."""
    retry_after_s: int = 1
    """`Retry-After` sent with 503 when the engines are overloaded."""
    body_timeout_s: float = 30.0
    """A request body not received whole within this many seconds gets 408."""

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name: must not be empty")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes: must be >= 1, got {self.max_body_bytes}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s: must be >= 0, got {self.retry_after_s}")
        if self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s: must be > 0, got {self.body_timeout_s}")

    @property
    def effective_api_key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.info).model_dump()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class BodyLimit:
    """ASGI middleware: bodies over `max_bytes` get 413, whether Content-Length says so or the
    bytes arrive chunked; a body not received whole within `timeout_s` gets 408 (a client that
    sends less than its Content-Length, or trickles it, holds nothing for long). The body is
    read here, then handed on unchanged."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _too_large(self.max_bytes).response()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        body, more = b"", True
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while more:
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.0))
            except TimeoutError:
                timed_out = ApiError(
                    408, f"request body not received within {self.timeout_s:g} s",
                    code="request_timeout", headers={"Connection": "close"},
                )  # fmt: skip
                return await timed_out.response()(scope, receive, send)
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # later calls wait for the client to disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"request body is larger than {max_bytes} bytes", code="body_too_large")


def create_openai_app(
    client: EngineClient, tokenizer, settings: ApiSettings, sink: MetricSink | None = None
) -> FastAPI:
    """The FastAPI app serving `client`'s engines under `settings.served_model_name`; with a
    metric `sink`, its responses are counted by route and status. Every error is OpenAI's
    error JSON. With an API key, the interactive docs and the OpenAPI schema are off."""
    docs = {} if settings.effective_api_key is None else dict(
        docs_url=None, redoc_url=None, openapi_url=None
    )  # fmt: skip
    app = FastAPI(title="spin-ray OpenAI-compatible API", **docs)
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    server = _OpenAIServer(client, tokenizer, settings)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        return _validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} not allowed"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        text = message.get(err.status_code, str(err.detail))
        return ApiError(err.status_code, text, code=code, headers=err.headers).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception):
        logger.exception("unhandled error")
        return _internal_error(err).response()

    auth = Depends(server.check_api_key)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engines can serve; 503 with the reason when they cannot."""
        reason = await client.unavailable_reason()
        if reason is not None:
            raise _unavailable(EngineUnavailableError(reason), settings.retry_after_s)
        return Response(status_code=200)

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> ModelList:
        info = await server.model_info()
        return ModelList(
            data=[ModelCard(id=settings.served_model_name, max_model_len=info.max_model_len)]
        )

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(body: CompletionRequest):
        return await server.completions(body)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(body: ChatCompletionRequest):
        return await server.chat_completions(body)

    if sink is not None:  # outermost: it sees BodyLimit's 413s too
        routes = frozenset(route.path for route in app.routes)
        app.add_middleware(
            ResponseCounter, sink=sink, model=settings.served_model_name, routes=routes
        )
    return app


def unavailable_app(reason: str, retry_after_s: int) -> FastAPI:
    """An app that answers every request with 503 and `reason` (the ingress could not set
    itself up, e.g. the model's tokenizer does not load): the cause is visible at once, on
    every route, /health included."""
    app = FastAPI(title="spin-ray OpenAI-compatible API (unavailable)", openapi_url=None)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"])
    async def _any(path: str):
        return _unavailable(EngineUnavailableError(reason), retry_after_s).response()

    return app


class _OpenAIServer:
    def __init__(self, client: EngineClient, tokenizer, settings: ApiSettings):
        self.client, self.tokenizer, self.settings = client, tokenizer, settings
        self._model_info: ModelInfo | None = None
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="spin-ray-tokenizer")
        """Tokenizes and applies chat templates, one at a time, off the event loop."""
        self.max_token_chars = max(len(token) for token in tokenizer.get_vocab())
        """Characters of the longest token (byte-level vocabularies: bytes ≥ characters)."""

    def check_api_key(self, request: Request) -> None:
        key = self.settings.effective_api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401,
                "missing or incorrect API key in the Authorization header (Bearer <key>)",
                code="invalid_api_key",
            )

    async def model_info(self) -> ModelInfo:
        """The engines' model, asked once they answer (503 until then)."""
        if self._model_info is None:
            try:
                self._model_info = await self.client.model_info()
            except EngineUnavailableError as err:
                raise _unavailable(err, self.settings.retry_after_s) from err
        return self._model_info

    # ------------------------------------------------------------ endpoints

    async def completions(self, body: CompletionRequest) -> Response:
        self._check_model(body.model)
        prompt = body.single_prompt
        info = await self.model_info()
        if isinstance(prompt, str):
            self._check_text(prompt, "prompt", len(prompt), info)
            prompt_ids = await self._off_loop(lambda: self.tokenizer(prompt)["input_ids"])
        else:
            prompt_ids = list(prompt)
        max_tokens = self._max_tokens(
            prompt_ids, body.max_tokens, default=16, param="prompt", info=info
        )
        request = EngineRequest(
            new_id("cmpl"), prompt_ids, self._params(body, max_tokens, body.logprobs)
        )
        stream, first = await self._start(request)
        head = dict(id=request.request_id, created=int(time.time()), model=body.model)
        if body.stream:
            chunks = self._completion_chunks(stream, first, head, len(prompt_ids), body)
            return _sse(chunks, stream)
        outputs = await self._collect(stream, first)
        text = "".join(o.outputs[0].text for o in outputs)
        logprobs = _flat_logprobs(outputs) if body.logprobs is not None else None
        return JSONResponse(
            CompletionResponse(
                **head,
                choices=[
                    CompletionChoice(
                        text=text,
                        logprobs=self._completion_logprobs(logprobs, 0)
                        if logprobs is not None
                        else None,
                        finish_reason=outputs[-1].outputs[0].finish_reason,
                    )
                ],
                usage=_usage(len(prompt_ids), outputs),
            ).model_dump()
        )

    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        info = await self.model_info()
        prompt_ids = await self._apply_chat_template(body, info)
        max_tokens = self._max_tokens(
            prompt_ids, body.requested_max_tokens, default=None, param="messages", info=info
        )
        top = (body.top_logprobs or 0) if body.logprobs else None
        request = EngineRequest(new_id("chatcmpl"), prompt_ids, self._params(body, max_tokens, top))
        stream, first = await self._start(request)
        head = dict(id=request.request_id, created=int(time.time()), model=body.model)
        if body.stream:
            return _sse(self._chat_chunks(stream, first, head, len(prompt_ids), body), stream)
        outputs = await self._collect(stream, first)
        logprobs = _flat_logprobs(outputs) if body.logprobs else None
        return JSONResponse(
            ChatCompletionResponse(
                **head,
                choices=[
                    ChatChoice(
                        message=ChatResponseMessage(
                            content="".join(o.outputs[0].text for o in outputs)
                        ),
                        logprobs=self._chat_logprobs(logprobs) if logprobs is not None else None,
                        finish_reason=outputs[-1].outputs[0].finish_reason,
                    )
                ],
                usage=_usage(len(prompt_ids), outputs),
            ).model_dump()
        )

    # ------------------------------------------------------------ request side

    def _check_model(self, model: str) -> None:
        if model != self.settings.served_model_name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist; this server serves "
                f"`{self.settings.served_model_name}`.",
                param="model",
                code="model_not_found",
            )

    async def _apply_chat_template(self, body: ChatCompletionRequest, info) -> list[int]:
        messages = [m.template_dict() for m in body.messages]
        total = sum(len(m["content"]) for m in messages)
        for m in messages:
            self._check_text(m["content"], "messages", total, info)

        def apply():
            try:
                ids = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=body.add_generation_prompt, tokenize=True
                )
            except Exception as err:  # template errors: a message the template rejects
                raise ApiError(
                    400, f"messages: chat template failed: {err}", param="messages"
                ) from err
            return ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids

        return await self._off_loop(apply)

    def _check_text(self, text: str, param: str, total_chars: int, info: ModelInfo) -> None:
        """Reject text that is not Unicode (lone surrogates) or that is surely longer than the
        context (`total_chars` over max_model_len × the longest token), before tokenizing."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                400, f"{param}: contains a lone UTF-16 surrogate; send valid Unicode text",
                param=param,
            ) from None  # fmt: skip
        bound = info.max_model_len * self.max_token_chars
        if total_chars > bound:
            raise ApiError(
                400,
                f"This model's maximum context length is {info.max_model_len} "
                f"tokens; your {param} has {total_chars} characters, more than that many "
                "tokens can hold.",
                param=param,
                code="context_length_exceeded",
            )

    async def _off_loop(self, tokenize) -> list[int]:
        """Tokenize in the tokenizer's own thread: a long prompt never stalls the event loop
        (other requests, /health)."""
        ids = await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, tokenize)
        return list(ids)

    def _max_tokens(
        self, prompt_ids, requested: int | None, default: int | None, param: str, info: ModelInfo
    ) -> int:
        limit = info.max_model_len
        room = limit - len(prompt_ids)
        if room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens; your prompt has "
                f"{len(prompt_ids)} tokens, leaving no room to generate.",
                param=param,
                code="context_length_exceeded",
            )
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens; you asked for "
                f"{len(prompt_ids)} prompt tokens + {requested} completion tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    @staticmethod
    def _params(body, max_tokens: int, logprobs: int | None):
        try:
            return body.sampling_params(max_tokens, logprobs)
        except ValueError as err:
            raise _value_error(err) from err

    async def _start(self, request: EngineRequest):
        """Open the stream and wait for its first delta, so input errors and overload get
        their status before any byte of the response is sent."""
        stream = self.client.generate(request)
        try:
            first = await anext(stream)
        except EngineOverloadedError as err:
            await stream.aclose()
            raise ApiError(
                503,
                f"the server is overloaded: {err}; retry later",
                type="server_error",
                code="overloaded",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from err
        except EngineUnavailableError as err:
            await stream.aclose()
            raise _unavailable(err, self.settings.retry_after_s) from err
        except ValueError as err:
            await stream.aclose()
            raise _value_error(err) from err
        except BaseException:
            await stream.aclose()
            raise
        return stream, first

    async def _collect(self, stream, first: RequestOutput) -> list[RequestOutput]:
        try:
            return [output async for output in _chain(first, stream)]
        except EngineUnavailableError as err:
            raise _unavailable(err, self.settings.retry_after_s) from err
        finally:
            await stream.aclose()

    # ------------------------------------------------------------ response side

    async def _completion_chunks(self, stream, first, head, num_prompt, body):
        outputs = []
        offset = 0
        async for output in _chain(first, stream):
            outputs.append(output)
            completion = output.outputs[0]
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(completion.logprobs or [], offset)
                logprobs = logprobs.model_dump()
            offset += len(completion.text)
            chunk = {
                **head,
                "object": "text_completion",
                "choices": [
                    {
                        "index": 0,
                        "text": completion.text,
                        "logprobs": logprobs,
                        "finish_reason": completion.finish_reason,
                    }
                ],
            }
            if body.include_usage:
                chunk["usage"] = None
            yield chunk
        if body.include_usage:
            usage = _usage(num_prompt, outputs).model_dump()
            yield {**head, "object": "text_completion", "choices": [], "usage": usage}

    async def _chat_chunks(self, stream, first, head, num_prompt, body):
        base = {**head, "object": "chat.completion.chunk"}
        if body.include_usage:
            base["usage"] = None

        def chunk(delta: dict, logprobs=None, finish_reason=None) -> dict:
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            return {**base, "choices": [choice]}

        yield chunk({"role": "assistant", "content": ""})
        outputs = []
        async for output in _chain(first, stream):
            outputs.append(output)
            completion = output.outputs[0]
            if completion.text or (body.logprobs and completion.token_ids):
                logprobs = None
                if body.logprobs:
                    logprobs = self._chat_logprobs(completion.logprobs or []).model_dump()
                yield chunk({"content": completion.text}, logprobs)
            if completion.finish_reason is not None:
                yield chunk({}, finish_reason=completion.finish_reason)
        if body.include_usage:
            usage = _usage(num_prompt, outputs).model_dump()
            yield {**base, "choices": [], "usage": usage}

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _completion_logprobs(self, logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for lp in logprobs:
            text = self._token_text(lp.token_id)
            result.tokens.append(text)
            result.token_logprobs.append(lp.logprob)
            result.top_logprobs.append({self._token_text(t): v for t, v in lp.top.items()})
            result.text_offset.append(offset)
            offset += len(text)
        return result

    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = self._token_text(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        return ChatLogprobs(
            content=[
                TokenLogprobEntry(
                    **top(lp.token_id, lp.logprob).model_dump(),
                    top_logprobs=[top(t, v) for t, v in lp.top.items()],
                )
                for lp in logprobs
            ]
        )


async def _chain(first: RequestOutput, stream: AsyncIterator[RequestOutput]):
    yield first
    if not first.finished:
        async for output in stream:
            yield output


def _sse(chunks: AsyncIterator[dict], stream) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: `data: {json}\\n\\n` per chunk, then
    `data: [DONE]`. A failure mid-stream (the engine replica died) sends an error event,
    `data: {"error": {...}}`, before `[DONE]`: a stream always ends in one of the two. The
    engine stream is closed however the response ends."""

    async def events():
        try:
            async for chunk in chunks:
                yield _event(chunk)
        except EngineUnavailableError as err:
            yield _event(ErrorResponse(error=_unavailable(err, 0).info).model_dump())
        except Exception as err:  # any failure still ends the stream in OpenAI form
            logger.exception("stream failed")
            yield _event(ErrorResponse(error=_internal_error(err).info).model_dump())
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _unavailable(err: EngineUnavailableError, retry_after_s: int) -> ApiError:
    return ApiError(
        503, f"{err}; retry the request", type="server_error", code="engine_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )  # fmt: skip


def _internal_error(err: Exception) -> ApiError:
    return ApiError(
        500, f"internal error ({type(err).__name__}); see the server log",
        type="server_error", code="internal_error",
    )  # fmt: skip


def _flat_logprobs(outputs: list[RequestOutput]) -> list[TokenLogprob]:
    return [lp for o in outputs for lp in (o.outputs[0].logprobs or [])]


def _usage(num_prompt: int, outputs: list[RequestOutput]) -> Usage:
    completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    return Usage(
        prompt_tokens=num_prompt,
        completion_tokens=completion,
        total_tokens=num_prompt + completion,
    )


def _value_error(err: ValueError) -> ApiError:
    """A `ValueError` whose message starts with `field:` names that field as `param`."""
    message = str(err)
    param = getattr(err, "param", None)
    if param is None and ":" in message:
        head = message.split(":", 1)[0]
        param = head if head.isidentifier() else None
    return ApiError(400, message, param=param)


def _validation_error(err: RequestValidationError) -> ApiError:
    """The first pydantic error, as a 400 naming its field."""
    first = err.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return ApiError(400, str(cause), param=cause.param)
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, "request body is not valid JSON")
    param = loc[0] if loc else None
    where = ".".join(loc)
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return ApiError(400, message, param=param)
