"""The OpenAI ingress deployment: serves openai_api's FastAPI app, tokenizes, and streams each
request from a `SpinEngine` replica chosen by the KV working-set router."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator

from ray import serve
from ray.exceptions import (
    NodeDiedError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from spin_ray.metrics.ray_sink import RaySink
from spin_ray.models.loader import load_tokenizer
from spin_ray.outputs import RequestOutput
from spin_ray.serve.engine_client import (
    EngineDeadError,
    EngineOverloadedError,
    EngineRequest,
    EngineUnavailableError,
    ModelInfo,
)
from spin_ray.serve.openai_api import ApiSettings, create_openai_app, unavailable_app

logger = logging.getLogger(__name__)


MAX_ATTEMPTS = 3
"""Replicas a request is sent to at most, when the ones before failed before its first token."""
MODEL_INFO_TIMEOUT_S = 10.0
"""How long a request waits for an engine replica to say what model it serves."""
STATUS_TTL_S = 2.0
"""How long the engine deployment's status, read from the Serve controller, is reused."""
FAILED = ("DEPLOY_FAILED", "UNHEALTHY")


class RayEngineClient:
    """`EngineClient` over a `SpinEngine` deployment handle (streaming calls). A request whose
    replica fails before streaming anything is sent again (the router places it elsewhere); one
    that had streamed tokens ends with `EngineUnavailableError`."""

    def __init__(self, handle: DeploymentHandle):
        self.calls = handle
        self.handle = handle.options(stream=True)
        self._status: tuple[float, str | None] = (-STATUS_TTL_S, None)

    async def model_info(self) -> ModelInfo:
        try:
            return await asyncio.wait_for(
                self.calls.model_info.remote(), timeout=MODEL_INFO_TIMEOUT_S
            )
        except Exception as err:  # timed out, replica gone, queue full: none answered
            reason = await self.unavailable_reason()
            if reason is None:
                reason = f"no engine replica answered within {MODEL_INFO_TIMEOUT_S:g} s"
            raise EngineUnavailableError(reason) from err

    async def unavailable_reason(self) -> str | None:
        """From the Serve controller's status of the engine deployment (cached briefly)."""
        checked_at, reason = self._status
        if time.monotonic() - checked_at < STATUS_TTL_S:
            return reason
        reason = await asyncio.to_thread(self._deployment_failure)
        self._status = (time.monotonic(), reason)
        return reason

    def _deployment_failure(self) -> str | None:
        app = serve.status().applications.get(serve.get_replica_context().app_name)
        status = None if app is None else app.deployments.get(self.calls.deployment_name)
        if status is None or status.status not in FAILED:
            return None
        return f"the engine deployment is {status.status}: {status.message}"

    async def generate(self, request: EngineRequest) -> AsyncGenerator[RequestOutput, None]:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            streamed = False
            try:
                async for output in self._attempt(request):
                    streamed = True
                    yield output
                return
            except (RayActorError, WorkerCrashedError, NodeDiedError, EngineDeadError) as err:
                if streamed or attempt == MAX_ATTEMPTS:
                    raise EngineUnavailableError(f"the engine replica failed: {err}") from err
                logger.warning("request %s: replica failed, sending again", request.request_id)

    async def _attempt(self, request: EngineRequest) -> AsyncGenerator[RequestOutput, None]:
        response = None
        finished = False
        try:
            response = self.handle.generate.remote(request)
            async for output in response:
                finished = output.finished
                yield output
        except BackPressureError as err:
            raise EngineOverloadedError(str(err)) from err
        except RayTaskError as err:
            if isinstance(err.cause, ValueError):  # bad input, found by the engine
                raise ValueError(str(err.cause)) from err
            if isinstance(err.cause, EngineDeadError):  # its step loop stopped
                raise err.cause from err
            raise
        finally:
            if response is not None and not finished:
                # Best effort; it raises the call's own error if the call never got a replica.
                with contextlib.suppress(Exception):
                    response.cancel()


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    def __init__(
        self, engine: DeploymentHandle, model: str, tokenizer: str | None, settings: ApiSettings
    ):
        self.engine = engine
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings

    async def __serve_build_asgi_app__(self):
        # the engines are not waited for: until they answer, requests get 503 (with the cause
        # once their deployment failed), never a hang
        try:
            tokenizer = load_tokenizer(self.model, self.tokenizer)
        except Exception as err:  # a bad model or tokenizer: say so on every route
            logger.exception("the tokenizer does not load")
            reason = f"the model's tokenizer does not load: {type(err).__name__}: {err}"
            return unavailable_app(reason, self.settings.retry_after_s)
        client = RayEngineClient(self.engine)
        return create_openai_app(client, tokenizer, self.settings, RaySink())
