"""The FastAPI application: OpenAI routes over one served model."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import ExitStack, aclosing, asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from subjective.model_registry.compute_slots import ENV_VAR as COMPUTE_SLOTS_ENV
from subjective.model_registry.compute_slots import FrontEndSlots
from subjective.model_registry.config import ModelConfig
from subjective.server.account_routes import admin_router, usage_router
from subjective.server.admin_bootstrap import adopt_admin_key_file
from subjective.server.admission import AdmissionGate
from subjective.server.auth import Authenticator, caller
from subjective.server.billed_request import Billing, checkpoints
from subjective.server.choices import CompletionChoices, chat_logprobs
from subjective.server.config import ServerConfig
from subjective.server.errors import (
    CLIENT_GONE,
    ERROR_TYPES,
    APIError,
    ClientGone,
    engine_dead_error,
    error_body,
    install_error_handlers,
    text_is_encodable,
)
from subjective.server.generation import ChoiceDelta, Generator
from subjective.server.journal import open_journal
from subjective.server.keys import open_key_store
from subjective.server.ledger import open_server_ledger
from subjective.server.meter import Meter
from subjective.server.metrics import ServerMetrics
from subjective.server.openapi_errors import document_errors
from subjective.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from subjective.server.rate_limit import open_rate_limiter
from subjective.server.recovery import recover_interrupted
from subjective.server.service import CallerDep, Service, ServiceDep
from subjective.server.threshold import ThresholdControl
from subjective.server.tool_calls import ToolCalling, ToolCallStream
from subjective.server.usage_page import install_usage_page
from subjective.server.usage_writer import UsageWriter

log = logging.getLogger(__name__)
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 429, 503)
}


def sse(payload: BaseModel, *, exclude_none: bool = True) -> str:
    return f"data: {payload.model_dump_json(exclude_none=exclude_none)}\n\n"


async def sse_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Frames of a stream, then `[DONE]`; a failure mid-stream becomes an error event, in
    the shape of an error response (`param` and `code` present, null or not)."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        body = error_body(exc.status, exc.message, code=exc.code, param=exc.param)
        yield sse(body, exclude_none=False)
    except Exception:  # the client already has a 200: tell it in-band
        log.exception("a stream failed")
        yield sse(error_body(500, "The server failed while generating."), exclude_none=False)
    yield "data: [DONE]\n\n"


def create_app(config: ServerConfig, on_engine_dead: Callable[[], None] | None = None) -> FastAPI:
    """The app; builds the vLLM engine at start-up (`app.state.service.generator.engine`).

    Keys, ledger and spool come from the environment (REDIS_URL, SUBJECTIVE_KEYS_PATH,
    SUBJECTIVE_LEDGER_PATH, SUBJECTIVE_SPOOL_DIR): see `keys.open_key_store` and
    `ledger.open_server_ledger`. Once the engine died the app answers 503 and, shortly
    after, calls `on_engine_dead` (`subjective serve`: stop, then exit non-zero).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from transformers import AutoTokenizer

        from subjective.server.engine import (
            build_engine,
            engine_config,
            recurrent_state_dtype,
            watch_engine,
        )

        model = ModelConfig.from_folder(config.model_dir)
        config.pricing.rate(config.served_model_name)  # no price, no serving: fail now
        metrics = ServerMetrics()
        # Closed in reverse order, each even if an earlier one fails (a dead engine's
        # shutdown, say): the writer always drains its records into the ledger or spool.
        with ExitStack() as teardown:
            keys = open_key_store()
            teardown.callback(keys.close)
            if config.admin_key_file is not None:
                adopt_admin_key_file(keys, config.admin_key_file)
            ledger = open_server_ledger()
            teardown.callback(ledger.close)
            ledger.start()
            journal = open_journal()
            teardown.callback(journal.close_db)
            slots = FrontEndSlots.create()
            teardown.callback(slots.close)
            vllm_config = engine_config(config)
            meter = Meter(model, slots, recurrent_state_dtype(vllm_config))
            # Requests a dead server left in flight: billed once, before anything new runs.
            recover_interrupted(journal, ledger, meter, config.pricing)
            # The engine core (another process) finds the per-request compute table here.
            os.environ[COMPUTE_SLOTS_ENV] = str(slots.path)
            served_engine = build_engine(vllm_config)
            teardown.callback(served_engine.shutdown)
            writer = UsageWriter(ledger, metrics, journal)
            teardown.callback(writer.close)
            generator = Generator(
                served_engine, AutoTokenizer.from_pretrained(config.model_dir), config
            )
            teardown.callback(generator.close)
            app.state.service = Service(
                config=config,
                generator=generator,
                threshold=ThresholdControl(model),
                authenticator=Authenticator(
                    keys, ledger, open_rate_limiter(), allow_anonymous=config.allow_anonymous
                ),
                billing=Billing(meter, config.pricing, writer, metrics, journal),
                ledger=ledger,
                created=int(time.time()),
            )
            checkpointer = asyncio.create_task(checkpoints(app.state.service.billing))
            teardown.callback(checkpointer.cancel)
            if on_engine_dead is not None:
                watcher = asyncio.create_task(watch_engine(generator, on_engine_dead))
                teardown.callback(watcher.cancel)
            yield

    # No /docs or /redoc: their pages load scripts from a CDN. No redirect to the path with
    # or without a trailing slash: its Location would be built from the Host header.
    app = FastAPI(
        title="subjective",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
    )
    install_error_handlers(app)
    document_errors(app)
    metrics_access = [] if config.public_metrics else [Depends(caller)]
    # Inside the metrics middleware below (added later, so outer): its refusals are counted.
    app.add_middleware(AdmissionGate, max_body_bytes=config.max_body_bytes)

    @app.middleware("http")
    async def count_rejections(request: Request, call_next):
        response = await call_next(request)
        status = response.status_code
        if 400 <= status < CLIENT_GONE and request.url.path.startswith("/v1/"):
            request.app.state.service.billing.metrics.observe_rejected(
                model=config.served_model_name,
                status_code=status,
                error_type=ERROR_TYPES.get(status, "invalid_request_error"),
            )
        return response

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health(service: ServiceDep) -> dict[str, str]:
        """Liveness: 503 `engine_dead` once the engine died (the process is exiting)."""
        _require_engine(service)
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(service: ServiceDep) -> dict[str, str]:
        """Readiness: 200 while the engine serves, 503 once it died. While the model loads
        the server does not listen yet, which a probe also reads as not ready."""
        _require_engine(service)
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False, dependencies=metrics_access)
    async def metrics(service: ServiceDep) -> Response:
        """Gauges are read from their sources at scrape time, then everything is rendered.
        Needs an API key unless the server runs with `--public-metrics`."""
        metrics = service.billing.metrics
        metrics.set_spool_depth(await asyncio.to_thread(service.ledger.spool_depth))
        if service.threshold.base is not None:
            metrics.set_threshold(config.served_model_name, service.threshold.base)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(service: ServiceDep, _: CallerDep) -> ModelList:
        card = ModelCard(
            id=config.served_model_name,
            created=service.created,
            max_model_len=config.max_model_len,
        )
        return ModelList(data=[card])

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        dependencies=[Depends(text_is_encodable)],
    )
    async def create_completion(
        body: CompletionRequest, service: ServiceDep, key: CallerDep, request: Request
    ):
        generator = service.generator
        prompts = await generator.tokenized(lambda: generator.completion_prompts(body))
        run, deltas = await service.begin(key, body, prompts, body.max_tokens, "cmpl")
        created = int(time.time())
        choices = CompletionChoices(
            service.generator.echoed_prompts(body), body.n, logprobs=body.logprobs is not None
        )

        def response(choices: list[CompletionChoice], usage: Usage | None = None):
            return CompletionResponse(
                id=run.request_id, created=created, model=body.model, choices=choices, usage=usage
            )

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                async with aclosing(deltas):
                    async for delta in deltas:
                        yield sse(response([choices.choice(delta)]))
                await run.stored()
                if include_usage:
                    yield sse(response([], run.usage()))

            return StreamingResponse(sse_stream(events()), media_type="text/event-stream")

        merged = await _collect_while_connected(request, deltas)
        await run.stored()
        return response([choices.choice(delta) for delta in merged], run.usage())

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        dependencies=[Depends(text_is_encodable)],
    )
    async def create_chat_completion(
        body: ChatCompletionRequest, service: ServiceDep, key: CallerDep, request: Request
    ):
        generator = service.generator
        prompt = await generator.tokenized(lambda: generator.chat_prompt(body))
        tools = ToolCalling(body, generator.tokenizer) if body.calls_tools() else None
        run, deltas = await service.begin(
            key,
            body,
            [prompt],
            body.token_budget(),
            "chatcmpl",
            tools.structured_outputs if tools else None,
        )
        created = int(time.time())

        def logprobs(delta: ChoiceDelta) -> ChatLogprobs | None:
            if not body.logprobs:
                return None
            return chat_logprobs(delta.logprobs or [], body.top_logprobs or 0)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            parsers: dict[int, ToolCallStream] = {}

            def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
                return sse(
                    ChatCompletionChunk(
                        id=run.request_id,
                        created=created,
                        model=body.model,
                        choices=choices,
                        usage=usage,
                    )
                )

            def chunk_choice(delta: ChoiceDelta) -> ChatChunkChoice | None:
                """The delta as a chunk's choice; None when a tool call holds it back."""
                choice = ChatChunkChoice(
                    index=delta.index,
                    delta=ChatDelta(content=delta.text),
                    finish_reason=delta.finish_reason,
                    logprobs=logprobs(delta),
                )
                if tools is None:
                    return choice
                parser = parsers.setdefault(delta.index, tools.stream(prompt))
                finished = delta.finish_reason is not None
                choice.delta = parser.delta(delta.text, delta.token_ids, finished)
                choice.finish_reason = tools.finish_reason(delta.finish_reason, parser.called)
                held = choice.delta == ChatDelta() and not finished and choice.logprobs is None
                return None if held else choice

            async def events() -> AsyncIterator[str]:
                yield chunk(
                    [
                        ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                        for i in range(body.n)
                    ]
                )
                async with aclosing(deltas):
                    async for delta in deltas:
                        if (choice := chunk_choice(delta)) is not None:
                            yield chunk([choice])
                await run.stored()
                if include_usage:
                    yield chunk([], run.usage())

            return StreamingResponse(sse_stream(events()), media_type="text/event-stream")

        merged = await _collect_while_connected(request, deltas)
        await run.stored()

        def choice(delta: ChoiceDelta) -> ChatChoice:
            message = AssistantMessage(content=delta.text)
            finish_reason = delta.finish_reason
            if tools is not None:
                content, calls = tools.message(delta.text)
                message = AssistantMessage(content=content, tool_calls=calls or None)
                finish_reason = tools.finish_reason(finish_reason, bool(calls))
            return ChatChoice(
                index=delta.index,
                message=message,
                finish_reason=finish_reason,
                logprobs=logprobs(delta),
            )

        return ChatCompletionResponse(
            id=run.request_id,
            created=created,
            model=body.model,
            choices=[choice(delta) for delta in merged],
            usage=run.usage(),
        )

    app.include_router(usage_router)
    app.include_router(admin_router)
    install_usage_page(app)
    return app


def _require_engine(service: Service) -> None:
    if service.generator.engine_dead:
        raise engine_dead_error()


async def _collect_while_connected(
    request: Request, deltas: AsyncGenerator[ChoiceDelta, None]
) -> list[ChoiceDelta]:
    """`_collect`, cancelled as soon as the client disconnects: the engine aborts the request
    and it is billed as `cancelled` for the work done (then `ClientGone`)."""
    collecting = asyncio.ensure_future(_collect(deltas))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((collecting, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collecting.done():
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
    if collecting.cancelled():
        raise ClientGone()
    return collecting.result()


async def _disconnected(request: Request) -> None:
    """Return once the client hangs up (the body is read: the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(deltas: AsyncGenerator[ChoiceDelta, None]) -> list[ChoiceDelta]:
    """Each choice's deltas as one, by index."""
    merged: dict[int, ChoiceDelta] = {}
    async with aclosing(deltas):
        async for delta in deltas:
            earlier = merged.get(delta.index)
            merged[delta.index] = delta if earlier is None else earlier.then(delta)
    return [merged[index] for index in sorted(merged)]
