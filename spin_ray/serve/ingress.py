"""The OpenAI ingress deployment: serves openai_api's FastAPI app, tokenizes, and streams each
request from a `SpinEngine` replica chosen by the KV working-set router."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator

from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
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
from spin_ray.serve.openai_api import ApiSettings, create_openai_app

logger = logging.getLogger(__name__)


MAX_ATTEMPTS = 3
"""Replicas a request is sent to at most, when the ones before failed before its first token."""


class RayEngineClient:
    """`EngineClient` over a `SpinEngine` deployment handle (streaming calls). A request whose
    replica fails before streaming anything is sent again (the router places it elsewhere); one
    that had streamed tokens ends with `EngineUnavailableError`."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle.options(stream=True)

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
        info: ModelInfo = await self.engine.model_info.remote()
        tokenizer = load_tokenizer(self.model, self.tokenizer)
        client = RayEngineClient(self.engine)
        return create_openai_app(client, tokenizer, info, self.settings, RaySink())
