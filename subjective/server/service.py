"""The served model and its billing, as the routes see it (a FastAPI dependency)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from subjective.model_registry.vllm_plugin import EXTRA_ARG_QUALITY, EXTRA_ARG_THRESHOLD
from subjective.server.auth import Authenticator, admin_key, caller
from subjective.server.billed_request import BilledRequest, Billing
from subjective.server.config import ServerConfig
from subjective.server.errors import APIError, engine_dead_error
from subjective.server.generation import ChoiceDelta, Generator, TokenCounts
from subjective.server.keys import ApiKey
from subjective.server.ledger import SpoolingLedger
from subjective.server.protocol import SamplingFields
from subjective.server.threshold import ThresholdControl


@dataclass
class Service:
    """What the routes need: the served model, its generator, threshold and billing."""

    config: ServerConfig
    generator: Generator
    threshold: ThresholdControl
    authenticator: Authenticator
    billing: Billing
    ledger: SpoolingLedger
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

    async def begin(
        self,
        key: ApiKey,
        body: SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        id_prefix: str,
        constraint=None,
    ) -> tuple[BilledRequest, AsyncGenerator[ChoiceDelta, None]]:
        """Validate, admit (rate; budget: its worst case reserved), then start the request on
        the engine; `constraint`: see `Generator.sampling_params`.

        With the engine dead, or a request vLLM would refuse, nothing is counted or recorded
        (no rate-limit token spent, no compute slot kept)."""
        if self.generator.engine_dead:
            raise engine_dead_error()
        self.check_model(body.model)
        budget = self.generator.max_tokens(prompts, max_tokens)
        quality = body.quality or self.config.default_quality
        threshold = self.threshold.for_quality(quality)
        ticket = self.billing.meter.open()
        extra_args: dict[str, object] = {EXTRA_ARG_QUALITY: quality, **ticket.extra_args()}
        if threshold is not None:
            extra_args[EXTRA_ARG_THRESHOLD] = threshold
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        try:
            params = self.generator.sampling_params(body, budget, extra_args, constraint)
            worst_case = 0  # only a key with a budget needs it (a count, off the event loop)
            if key.flops_budget is not None:
                worst_case = await asyncio.to_thread(
                    self.billing.meter.worst_case,
                    [len(p) for p in prompts],
                    body.n,
                    budget,
                    params.prompt_logprobs is not None,
                )
            reserved = await self.authenticator.admit(key, request_id, worst_case)
        except BaseException:
            self.billing.meter.release(ticket)
            raise
        run = BilledRequest(
            request_id=request_id,
            key=key,
            model=body.model,
            quality=quality,
            threshold=threshold,
            counts=TokenCounts(
                prompt_lengths=[len(p) for p in prompts],
                n=body.n,
                prompt_logprobs=params.prompt_logprobs is not None,
            ),
            ticket=ticket,
            billing=self.billing,
            streamed=body.stream,
            reserved=reserved,
        )
        await run.journaled()
        stream = self.generator.stream(request_id, prompts, params, generates=body.generates())
        return run, run.deltas(stream)


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
CallerDep = Annotated[ApiKey, Depends(caller)]
AdminDep = Annotated[ApiKey, Depends(admin_key)]
