"""Engine deltas as OpenAI choices: the prompt echoed, logprobs in each route's shape."""

from __future__ import annotations

from subjective.server.generation import ChoiceDelta, TokenLogprob
from subjective.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    TopLogprob,
)


def chat_logprobs(tokens: list[TokenLogprob], top_logprobs: int) -> ChatLogprobs:
    """Chat's shape: each token with its `top_logprobs` likeliest alternatives."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=token.token,
                logprob=token.logprob,
                bytes=list(token.token.encode()),
                top_logprobs=[
                    TopLogprob(token=c.token, logprob=c.logprob, bytes=list(c.token.encode()))
                    for c in token.top or []
                    if c.rank <= top_logprobs
                ],
            )
            for token in tokens
        ]
    )


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The completions API's shape; `offset`: where the first token starts in the choice's
    text. Each position's top tokens are the `logprobs` likeliest and the chosen one."""
    starts, position = [], offset
    for token in tokens:
        starts.append(position)
        position += len(token.token)
    return CompletionLogprobs(
        tokens=[token.token for token in tokens],
        token_logprobs=[token.logprob for token in tokens],
        top_logprobs=[
            None if token.top is None else {c.token: c.logprob for c in token.top}
            for token in tokens
        ],
        text_offset=starts,
    )


class CompletionChoices:
    """Completion choices from deltas, in order: a choice's first carries its echoed prompt
    (text, and with logprobs the prompt's token logprobs) before its new text."""

    def __init__(self, echoed: list[str] | None, n: int, logprobs: bool) -> None:
        self.echoed = echoed
        self.n = n
        self.logprobs = logprobs
        self._sent: dict[int, int] = {}  # characters of each choice's text sent so far

    def choice(self, delta: ChoiceDelta) -> CompletionChoice:
        offset = self._sent.get(delta.index)
        text, tokens = delta.text, delta.logprobs or []
        if offset is None and self.echoed is not None:
            text = self.echoed[delta.index // self.n] + text
            tokens = (delta.prompt_logprobs or []) + tokens
        offset = offset or 0
        self._sent[delta.index] = offset + len(text)
        return CompletionChoice(
            index=delta.index,
            text=text,
            finish_reason=delta.finish_reason,
            logprobs=completion_logprobs(tokens, offset) if self.logprobs else None,
        )
