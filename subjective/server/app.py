"""The FastAPI application: OpenAI routes over one served model."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from subjective.server.config import Quality, ServerConfig
from subjective.server.errors import APIError, error_body, install_error_handlers
from subjective.server.generation import ChoiceDelta, Generator, TokenCounts
from subjective.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)


@dataclass
class Service:
    """What the routes need: the served model's name, its generator and the config."""

    config: ServerConfig
    generator: Generator
    created: int

    def check_model(self, name: str) -> None:
        if name != self.config.served_model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist. This server serves "
                f"'{self.config.served_model_name}'.",
                code="model_not_found",
                param="model",
            )

    def quality(self, request: SamplingFields) -> Quality:
        return request.quality or self.config.default_quality


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def usage_of(counts: TokenCounts) -> Usage:
    completion = counts.total_completion_tokens
    return Usage(
        prompt_tokens=counts.prompt_tokens,
        completion_tokens=completion,
        total_tokens=counts.prompt_tokens + completion,
    )


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


async def sse_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Frames of a stream, then `[DONE]`; a failure mid-stream becomes an error event."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield sse(error_body(exc.status, exc.message, code=exc.code))
    except Exception:  # the client already has a 200: tell it in-band
        yield sse(error_body(500, "The server failed while generating."))
    yield "data: [DONE]\n\n"


def create_app(config: ServerConfig, engine=None) -> FastAPI:
    """The app; builds the vLLM engine at start-up unless one is given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from transformers import AutoTokenizer

        from subjective.server.engine import build_engine

        served_engine = engine if engine is not None else build_engine(config)
        tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
        app.state.service = Service(
            config=config,
            generator=Generator(served_engine, tokenizer, config),
            created=int(time.time()),
        )
        try:
            yield
        finally:
            if engine is None:
                served_engine.shutdown()

    app = FastAPI(title="subjective", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(service: ServiceDep) -> ModelList:
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
        responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    )
    async def create_completion(body: CompletionRequest, service: ServiceDep):
        service.check_model(body.model)
        generator = service.generator
        prompts = generator.completion_prompts(body)
        params = generator.sampling_params(body, prompts, body.max_tokens, service.quality(body))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        counts = TokenCounts(prompt_tokens=sum(len(p) for p in prompts))
        deltas = generator.stream(request_id, prompts, params)
        created = int(time.time())

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                async for delta in deltas:
                    counts.add(delta)
                    choice = CompletionChoice(
                        index=delta.index, text=delta.text, finish_reason=delta.finish_reason
                    )
                    yield sse(
                        CompletionResponse(
                            id=request_id, created=created, model=body.model, choices=[choice]
                        )
                    )
                if include_usage:
                    yield sse(
                        CompletionResponse(
                            id=request_id,
                            created=created,
                            model=body.model,
                            choices=[],
                            usage=usage_of(counts),
                        )
                    )

            return StreamingResponse(sse_stream(events()), media_type="text/event-stream")

        texts, finish = await _collect(deltas, counts)
        choices = [
            CompletionChoice(index=i, text=texts[i], finish_reason=finish[i]) for i in sorted(texts)
        ]
        return CompletionResponse(
            id=request_id,
            created=created,
            model=body.model,
            choices=choices,
            usage=usage_of(counts),
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        response_model_exclude_none=True,
        responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    )
    async def create_chat_completion(body: ChatCompletionRequest, service: ServiceDep):
        service.check_model(body.model)
        generator = service.generator
        prompt = generator.chat_prompt(body)
        params = generator.sampling_params(
            body, [prompt], body.token_budget(), service.quality(body)
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        counts = TokenCounts(prompt_tokens=len(prompt))
        deltas = generator.stream(request_id, [prompt], params)
        created = int(time.time())

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
                return sse(
                    ChatCompletionChunk(
                        id=request_id,
                        created=created,
                        model=body.model,
                        choices=choices,
                        usage=usage,
                    )
                )

            async def events() -> AsyncIterator[str]:
                yield chunk(
                    [
                        ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                        for i in range(body.n)
                    ]
                )
                async for delta in deltas:
                    counts.add(delta)
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=delta.index,
                                delta=ChatDelta(content=delta.text),
                                finish_reason=delta.finish_reason,
                            )
                        ]
                    )
                if include_usage:
                    yield chunk([], usage_of(counts))

            return StreamingResponse(sse_stream(events()), media_type="text/event-stream")

        texts, finish = await _collect(deltas, counts)
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=finish[i])
            for i in sorted(texts)
        ]
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=body.model,
            choices=choices,
            usage=usage_of(counts),
        )

    return app


async def _collect(
    deltas: AsyncIterator[ChoiceDelta], counts: TokenCounts
) -> tuple[dict[int, str], dict[int, str | None]]:
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    async for delta in deltas:
        counts.add(delta)
        texts[delta.index] = texts.get(delta.index, "") + delta.text
        finish[delta.index] = delta.finish_reason
    return texts, finish
