"""Turn validated API requests into vLLM engine requests and merge their outputs.

One API request may fan out into several engine requests (a list of prompts); each engine
request may carry `n` samples. Outputs arrive as deltas, tagged with their choice index.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TypeVar

from subjective.server import tool_calls
from subjective.server.config import ServerConfig
from subjective.server.errors import APIError, engine_dead_error, refused_input
from subjective.server.meter import EngineTally
from subjective.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

# What a logprob of -inf is sent as (JSON has no infinity; OpenAI's and vLLM's choice).
LOGPROB_FLOOR = -9999.0
T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """One of the most likely tokens at a position; rank 1 is the likeliest."""

    token: str
    logprob: float
    rank: int


@dataclass(frozen=True)
class TokenLogprob:
    """A token of a choice or of its prompt, its logprob and the likeliest tokens at its
    position (by rank). A prompt's first token has neither: nothing precedes it."""

    token: str
    logprob: float | None
    top: list[Candidate] | None


@dataclass
class ChoiceDelta:
    """New text and tokens of one choice since its previous delta."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cached_tokens: int = 0  # prompt tokens vLLM served from its prefix cache
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked for
    # The prompt's tokens with their logprobs (prompt scoring): in a choice's first delta.
    prompt_logprobs: list[TokenLogprob] | None = None

    def then(self, later: ChoiceDelta) -> ChoiceDelta:
        """This delta and the same choice's next one as one."""
        return replace(
            later,
            text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids,
            cached_tokens=max(self.cached_tokens, later.cached_tokens),
            logprobs=(
                None
                if self.logprobs is None and later.logprobs is None
                else (self.logprobs or []) + (later.logprobs or [])
            ),
            prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs,
        )


@dataclass
class TokenCounts:
    """Tokens of one API request so far: what usage reports and the meter bills.

    Choice `i` is sample `i % n` of prompt `i // n`.
    """

    prompt_lengths: list[int]
    n: int = 1
    prompt_logprobs: bool = False  # the engine computes every prompt token's logits
    completion_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)

    def add(self, delta: ChoiceDelta) -> None:
        self.completion_tokens[delta.index] = self.completion_tokens.get(delta.index, 0) + len(
            delta.token_ids
        )
        prompt = delta.index // self.n
        self.cached_tokens[prompt] = max(self.cached_tokens.get(prompt, 0), delta.cached_tokens)

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lengths)

    def to_dict(self) -> dict:
        """JSON-ready (the journal's checkpoint)."""
        return {
            "prompt_lengths": self.prompt_lengths,
            "n": self.n,
            "prompt_logprobs": self.prompt_logprobs,
            "completion_tokens": dict(self.completion_tokens),
            "cached_tokens": dict(self.cached_tokens),
        }

    @classmethod
    def from_dict(cls, data: dict) -> TokenCounts:
        return cls(
            prompt_lengths=list(data["prompt_lengths"]),
            n=data["n"],
            prompt_logprobs=data["prompt_logprobs"],
            completion_tokens={int(k): v for k, v in data["completion_tokens"].items()},
            cached_tokens={int(k): v for k, v in data["cached_tokens"].items()},
        )

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
                prompt_logprobs=self.prompt_logprobs,
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
        # The longest text one token stands for: a prompt of B bytes has at least
        # B / max_token_bytes tokens, so an oversized prompt is refused before tokenising.
        self.max_token_bytes = max(
            len(text.encode(errors="replace"))
            for text in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        )
        # Tokenising runs here, off the event loop, one request at a time (a fast tokenizer
        # shared by threads fails with "Already borrowed").
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def tokenized(self, work: Callable[[], T]) -> T:
        """`work` (tokenising) on the tokenizer's thread, so the event loop keeps serving."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work)

    def close(self) -> None:
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    @property
    def engine_dead(self) -> bool:
        """vLLM's engine core is gone (its process or its worker died, or the loop reading
        its outputs failed): AsyncLLM's `errored`, set by its monitor thread as soon as the
        process exits. Unrecoverable in this process."""
        return self.engine.errored

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        return [
            self._encode(prompt) if isinstance(prompt, str) else self._checked_ids(prompt)
            for prompt in request.prompts()
        ]

    def echoed_prompts(self, request: CompletionRequest) -> list[str] | None:
        """Each prompt as text, for `echo` (None without it)."""
        if not request.echo:
            return None
        return [
            prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
            for prompt in request.prompts()
        ]

    def _checked_ids(self, prompt: list[int]) -> list[int]:
        vocab_size = len(self.tokenizer)
        if any(not 0 <= token < vocab_size for token in prompt):
            raise APIError(400, f"Token ids must lie in [0, {vocab_size}).", param="prompt")
        return prompt

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        """The rendered conversation's tokens; the tools are listed unless tool_choice is
        "none" (the model answers in text then)."""
        messages = [message.rendered() for message in request.messages]
        self._refuse_oversized(sum(m.text_bytes() for m in request.messages), "messages")
        tools = request.tools if request.calls_tools() else None
        text = self.tokenizer.apply_chat_template(
            messages,
            tools=[tool.model_dump(exclude_none=True) for tool in tools] if tools else None,
            chat_template=tool_calls.chat_template(request),
            tokenize=False,
            add_generation_prompt=True,
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _refuse_oversized(self, text_bytes: int, param: str) -> None:
        """400 `context_length_exceeded` when the text's byte length alone proves its tokens
        cannot fit the context (each token stands for at most `max_token_bytes` bytes)."""
        fewest = -(-text_bytes // self.max_token_bytes)
        if fewest >= self.config.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.config.max_model_len} tokens; "
                f"this prompt of {text_bytes} bytes has at least {fewest}.",
                code="context_length_exceeded",
                param=param,
            )

    def _encode(self, text: str) -> list[int]:
        self._refuse_oversized(len(text.encode()), "prompt")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        return ids

    def max_tokens(self, prompts: Sequence[list[int]], requested: int | None) -> int:
        """The completion budget; 400 `context_length_exceeded` if it cannot fit. Prompt
        scoring (0 tokens) still runs one engine step, so it needs room for one."""
        limit = self.config.max_model_len
        longest = max(len(p) for p in prompts)
        max_tokens = limit - longest if requested is None else requested
        if longest + max(max_tokens, 1) > limit:
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
        self,
        request: SamplingFields,
        max_tokens: int,
        extra_args: dict[str, object],
        constraint=None,
    ):
        """vLLM's SamplingParams, checked as the engine will check them (a bad value is a 400
        here, before the request starts); `extra_args` (quality, threshold, meter slot) reach
        the model plugin's gate and meter (DESIGN.md §4, §5); `constraint` (vLLM's
        StructuredOutputsParams for tool calls) replaces the request's `response_format`.
        Prompt scoring (`max_tokens` 0) runs one step, whose token `stream` drops."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        options = request.sampling_options()
        if options["min_tokens"] > max_tokens:
            raise APIError(
                400, f"min_tokens must not exceed the budget of {max_tokens}.", param="min_tokens"
            )
        structured = options.pop("structured_outputs", None)
        shape = StructuredOutputsParams(**structured) if structured else None
        try:
            params = SamplingParams(
                max_tokens=max(max_tokens, 1),
                structured_outputs=constraint or shape,
                # Every step's new tokens, streamed or not: a request's progress is known
                # whenever it stops (billing a cancelled or interrupted one for its tokens).
                output_kind=RequestOutputKind.DELTA,
                extra_args=extra_args,
                **options,
            )
            engine = self.engine
            params.verify(
                engine.model_config,
                engine.vllm_config.speculative_config,
                engine.vllm_config.structured_outputs_config,
                engine.tokenizer,
            )
        except (ValueError, VLLMValidationError) as error:
            refused = refused_input(error)
            if constraint is not None and refused.param is None:  # from the tools' schemas
                refused.message = f"The tools' parameters cannot be compiled: {refused.message}"
                refused.param = "tools"
            raise refused from error
        return params

    async def stream(
        self, request_id: str, prompts: Sequence[list[int]], params, *, generates: bool = True
    ) -> AsyncIterator[ChoiceDelta]:
        """Deltas of every choice of every prompt, as they come; aborts all on cancellation.
        With `generates` False (prompt scoring) the one sampled token is dropped."""
        from vllm.inputs import TokensPrompt

        queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

        async def pump(prompt_index: int, prompt: list[int]) -> None:
            engine_id = f"{request_id}-{prompt_index}"
            prompt_logprobs: list[TokenLogprob] | None = None
            started: set[int] = set()
            try:
                async for output in self.engine.generate(
                    TokensPrompt(prompt_token_ids=prompt), params, engine_id
                ):
                    if output.prompt_logprobs is not None and prompt_logprobs is None:
                        prompt_logprobs = self._scored(prompt, output.prompt_logprobs)
                    for sample in output.outputs:
                        first = sample.index not in started
                        started.add(sample.index)
                        await queue.put(
                            ChoiceDelta(
                                index=prompt_index * params.n + sample.index,
                                text=sample.text if generates else "",
                                token_ids=list(sample.token_ids) if generates else [],
                                finish_reason=sample.finish_reason,
                                cached_tokens=output.num_cached_tokens or 0,
                                logprobs=(
                                    self._scored(sample.token_ids, sample.logprobs)
                                    if generates and sample.logprobs is not None
                                    else None
                                ),
                                prompt_logprobs=prompt_logprobs if first else None,
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

    def _scored(self, token_ids: Sequence[int], steps: Sequence) -> list[TokenLogprob]:
        """vLLM's logprobs (per position: None, or token id -> Logprob) as ours."""
        return [
            self._token_logprob(token, step) for token, step in zip(token_ids, steps, strict=True)
        ]

    def _token_logprob(self, token_id: int, step) -> TokenLogprob:
        if step is None:
            return TokenLogprob(self.tokenizer.decode([token_id]), None, None)
        top = sorted(
            (
                Candidate(self._text(tid, lp), max(lp.logprob, LOGPROB_FLOOR), lp.rank)
                for tid, lp in step.items()
            ),
            key=lambda candidate: candidate.rank,
        )
        chosen = step[token_id]
        return TokenLogprob(self._text(token_id, chosen), max(chosen.logprob, LOGPROB_FLOOR), top)

    def _text(self, token_id: int, logprob) -> str:
        if logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])

    def _served_error(self, error: BaseException) -> BaseException:
        """A dead engine's failure (EngineDeadError, or whatever surfaced first) becomes the
        503 `engine_dead` the client sees; vLLM's refusal of the request's input (checked
        before its engine runs anything) a 400 naming the field, or the status vLLM gives
        (a full queue: 503); any other error stays as it is."""
        from vllm.exceptions import GracefulHTTPError, VLLMClientError

        if not isinstance(error, Exception):
            return error
        if self.engine_dead:
            served = engine_dead_error()
        elif isinstance(error, VLLMClientError):
            served = refused_input(error)
        elif isinstance(error, GracefulHTTPError):
            served = APIError(int(error.http_status), error.message, code="engine_refused")
        else:
            return error
        served.__cause__ = error
        return served
