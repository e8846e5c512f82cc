"""Turn validated API requests into vLLM engine requests and merge their outputs.

One API request may fan out into several engine requests (a list of prompts); each engine
request may carry `n` samples. Outputs arrive as deltas, tagged with their choice index.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from subjective.server.config import ServerConfig
from subjective.server.errors import APIError, engine_dead_error
from subjective.server.meter import EngineTally
from subjective.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass
class ChoiceDelta:
    """New text and tokens of one choice since its previous delta."""

    index: int
    text: str
    new_tokens: int
    finish_reason: str | None
    cached_tokens: int = 0  # prompt tokens vLLM served from its prefix cache


@dataclass
class TokenCounts:
    """Tokens of one API request so far: what usage reports and the meter bills.

    Choice `i` is sample `i % n` of prompt `i // n`.
    """

    prompt_lengths: list[int]
    n: int = 1
    completion_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)

    def add(self, delta: ChoiceDelta) -> None:
        self.completion_tokens[delta.index] = (
            self.completion_tokens.get(delta.index, 0) + delta.new_tokens
        )
        prompt = delta.index // self.n
        self.cached_tokens[prompt] = max(self.cached_tokens.get(prompt, 0), delta.cached_tokens)

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lengths)

    @property
    def total_completion_tokens(self) -> int:
        return sum(self.completion_tokens.values())

    def tallies(self) -> list[EngineTally]:
        """One per choice, as the dense meter counts them."""
        return [
            EngineTally(
                prompt_tokens=length,
                cached_tokens=self.cached_tokens.get(prompt, 0),
                completion_tokens=self.completion_tokens.get(prompt * self.n + sample, 0),
            )
            for prompt, length in enumerate(self.prompt_lengths)
            for sample in range(self.n)
        ]


class Generator:
    """Tokenises, checks limits, builds sampling parameters and runs requests on the engine."""

    def __init__(self, engine, tokenizer, config: ServerConfig) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config

    @property
    def engine_dead(self) -> bool:
        """vLLM's engine core is gone (its process or its worker died, or the loop reading
        its outputs failed): AsyncLLM's `errored`, set by its monitor thread as soon as the
        process exits. Unrecoverable in this process."""
        return self.engine.errored

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            return [self._encode(prompt)]
        if all(isinstance(item, int) for item in prompt):
            vocab_size = len(self.tokenizer)
            if any(not 0 <= token < vocab_size for token in prompt):
                raise APIError(400, f"Token ids must lie in [0, {vocab_size}).", param="prompt")
            return [list(prompt)]
        return [self._encode(text) for text in prompt]

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        return ids

    def max_tokens(self, prompts: Sequence[list[int]], requested: int | None) -> int:
        """The completion budget; 400 `context_length_exceeded` if it cannot fit."""
        limit = self.config.max_model_len
        longest = max(len(p) for p in prompts)
        max_tokens = limit - longest if requested is None else requested
        if longest + max_tokens > limit or max_tokens < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {longest + max_tokens} tokens ({longest} in the prompt, "
                f"{max_tokens} for the completion). Reduce the prompt or max_tokens.",
                code="context_length_exceeded",
                param="max_tokens" if longest < limit else "prompt",
            )
        return max_tokens

    def sampling_params(
        self, request: SamplingFields, max_tokens: int, extra_args: dict[str, object]
    ):
        """vLLM's SamplingParams; `extra_args` (quality, threshold, meter slot) reach the
        model plugin's gate and meter (DESIGN.md §4, §5). A stream gets every step's new
        tokens; otherwise the engine sends each request's output once, at its end."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=request.n,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
            extra_args=extra_args,
        )

    async def stream(
        self, request_id: str, prompts: Sequence[list[int]], params
    ) -> AsyncIterator[ChoiceDelta]:
        """Deltas of every choice of every prompt, as they come; aborts all on cancellation."""
        from vllm.inputs import TokensPrompt

        queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

        async def pump(prompt_index: int, prompt: list[int]) -> None:
            engine_id = f"{request_id}-{prompt_index}"
            try:
                async for output in self.engine.generate(
                    TokensPrompt(prompt_token_ids=prompt), params, engine_id
                ):
                    for sample in output.outputs:
                        await queue.put(
                            ChoiceDelta(
                                index=prompt_index * params.n + sample.index,
                                text=sample.text,
                                new_tokens=len(sample.token_ids),
                                finish_reason=sample.finish_reason,
                                cached_tokens=output.num_cached_tokens or 0,
                            )
                        )
                await queue.put(None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                await queue.put(self._served_error(exc))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        running = len(tasks)
        try:
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _served_error(self, error: BaseException) -> BaseException:
        """A dead engine's failure (EngineDeadError, or whatever surfaced first) becomes the
        503 `engine_dead` the client sees; any other error stays as it is."""
        if not isinstance(error, Exception) or not self.engine_dead:
            return error
        dead = engine_dead_error()
        dead.__cause__ = error
        return dead
