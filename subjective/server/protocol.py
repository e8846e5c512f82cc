"""Request and response bodies of the OpenAI HTTP API, as far as this server implements it.

Every field a client may send is declared, and nothing is silently ignored:
- a field we act on is validated, and a bad value is a 400 (with `param`) before any work;
- a field of the OpenAI schema we do not implement is a 400 naming it (`Unsupported`), unless
  it is sent with a value that cannot change the result (no `functions`, `modalities: ["text"]`);
- a field that cannot change the result (`user`, `metadata`, `store`, ...) is accepted and
  ignored (README, "OpenAI API conformance");
- any other field is a 400, as OpenAI answers it ("Unrecognized request argument").
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from subjective.server.config import Quality

MAX_STOP_SEQUENCES = 4
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
UNSUPPORTED = "unsupported_field"
# Integers reach vLLM's int32/int64 tensors and C code: larger ones are a 400 here, not a crash.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
StopText = Annotated[str, Field(min_length=1)]
# One request fans out into (prompts x n) engine sequences: bounded, so one request cannot
# fill the engine's batch on its own.
MAX_SEQUENCES_PER_REQUEST = 64
MAX_TOOLS = 128  # OpenAI's limit


def _refused_unless(*harmless: object) -> BeforeValidator:
    """A field we do not implement: a 400 naming it, unless its value is one of `harmless`
    (values that ask for nothing, such as an empty list of tools)."""

    def check(value: object, info: ValidationInfo) -> None:
        if value is None or any(value == allowed for allowed in harmless):
            return None
        raise PydanticCustomError(
            UNSUPPORTED,
            "'{field}' is not supported by this server (see README, OpenAI API conformance).",
            {"field": info.field_name},
        )

    return BeforeValidator(check)


Unsupported = Annotated[Any, _refused_unless()]
UnsupportedList = Annotated[Any, _refused_unless([])]
# OpenAI's rule for function names, which prompts and tool-call ids are built from.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class Request(BaseModel):
    """A request body: fields not declared are refused, and types are strict (no `"2"` for
    an integer, no `"yes"` for a boolean, no NaN or infinity)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: we add no obfuscation padding


class SamplingFields(Request):
    """What completions and chat completions share."""

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    # Token id (a string in JSON: parsed, not strict) -> bias added to its logit; -100 bans
    # it, 100 forces it.
    logit_bias: (
        dict[Annotated[TokenId, Strict(False)], Annotated[float, Field(ge=-100.0, le=100.0)]] | None
    ) = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # ignored: an end-user id for abuse monitoring
    # vLLM's sampling extras, as vLLM's own server takes them.
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] = 0  # 0 or -1: every token
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] = 1.0
    min_tokens: Count = 0
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    # Ours: trade compute for quality per request (DESIGN.md §4). None: the server's default.
    quality: Quality | None = None

    def sampling_options(self) -> dict[str, Any]:
        """SamplingParams fields of this request (the budget and output kind aside)."""
        return {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "logit_bias": self.logit_bias,
        }

    def generates(self) -> bool:
        """False when the client asked for no new token (prompt scoring)."""
        return True


class CompletionRequest(SamplingFields):
    prompt: (
        str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    )
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    # 0 only with `echo`: score the prompt (its tokens' logprobs), generate nothing.
    max_tokens: Count | None = 16
    best_of: Annotated[int, Field(ge=1, le=16)] | None = None
    suffix: Unsupported = None

    @field_validator("prompt")
    @classmethod
    def _bounded_fan_out(cls, value: str | list, info: ValidationInfo) -> str | list:
        texts = isinstance(value, list) and isinstance(value[0], str)
        prompts = len(value) if texts else 1
        if prompts * info.data.get("n", 1) > MAX_SEQUENCES_PER_REQUEST:
            raise ValueError(
                f"{prompts} prompts x n = {info.data.get('n', 1)} would run more than "
                f"{MAX_SEQUENCES_PER_REQUEST} sequences; send fewer per request"
            )
        return value

    @field_validator("max_tokens")
    @classmethod
    def _scoring_needs_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens 0 asks for no completion: it needs echo (prompt scoring)")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        # vLLM's v1 engine has no best_of: it returns all n samples it draws.
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of must equal n here (the server draws exactly n samples)")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def sampling_options(self) -> dict[str, Any]:
        return {
            **super().sampling_options(),
            "logprobs": self.logprobs,
            "prompt_logprobs": self.logprobs if self.echo else None,
        }

    def generates(self) -> bool:
        return self.max_tokens != 0


class TextPart(Request):
    type: Literal["text"]
    text: str


class FunctionCall(Request):
    name: FunctionName
    arguments: str  # JSON, as text: the template writes it into the prompt as it is

    @field_validator("arguments")
    @classmethod
    def _arguments_are_json(cls, arguments: str) -> str:
        try:
            json.loads(arguments)
        except ValueError as error:
            raise ValueError(f"arguments must be JSON text ({error})") from None
        return arguments


class ToolCall(Request):
    """A call the assistant made: in its message, and in the history a client sends back."""

    id: Annotated[str, Field(min_length=1)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    """A message of the conversation; its fields are checked against its role, each one
    naming itself when it does not fit (declared in the order the checks need)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None  # assistant only
    # Tool messages only: the call this message answers.
    tool_call_id: Annotated[str | None, Field(validate_default=True)] = None
    # Required, except beside an assistant's tool calls.
    content: Annotated[str | list[TextPart] | None, Field(validate_default=True)] = None
    name: str | None = None  # ignored: the model's chat template has no names
    function_call: Unsupported = None
    refusal: Unsupported = None
    audio: Unsupported = None
    annotations: UnsupportedList = None

    @field_validator("tool_calls")
    @classmethod
    def _calls_by_the_assistant(cls, calls: list[ToolCall] | None, info: ValidationInfo):
        if calls is not None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        return calls

    @field_validator("tool_call_id")
    @classmethod
    def _id_in_tool_messages(cls, call_id: str | None, info: ValidationInfo) -> str | None:
        if (call_id is None) == (info.data.get("role") == "tool"):
            raise ValueError("a tool message, and only a tool message, has a tool_call_id")
        return call_id

    @field_validator("content")
    @classmethod
    def _content_unless_calling(cls, content: str | list | None, info: ValidationInfo):
        if content is None and info.data.get("tool_calls") is None:
            raise ValueError("Field required (only an assistant's tool calls may go without)")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def text_bytes(self) -> int:
        """Bytes of the text the template writes into the prompt as it is."""
        arguments = (call.function.arguments for call in self.tool_calls or [])
        return len(self.text().encode()) + sum(len(text.encode()) for text in arguments)

    def rendered(self) -> dict[str, Any]:
        """This message as the chat template takes it."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls is not None:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(Request):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # arguments always follow `parameters` (tool_calls.py)

    @field_validator("parameters")
    @classmethod
    def _a_json_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as error:
                raise ValueError(f"not a JSON schema: {error.message}") from None
        return schema


class Tool(Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Request):
    name: FunctionName


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class TextFormat(Request):
    type: Literal["text"]

    def structured_outputs(self) -> dict[str, Any] | None:
        return None


class JsonObjectFormat(Request):
    type: Literal["json_object"]

    def structured_outputs(self) -> dict[str, Any] | None:
        return {"json_object": True}


class JsonSchema(Request):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the output always follows the schema (guided decoding)


class JsonSchemaFormat(Request):
    type: Literal["json_schema"]
    json_schema: JsonSchema

    def structured_outputs(self) -> dict[str, Any] | None:
        schema = self.json_schema.schema_
        return {"json_object": True} if schema is None else {"json": schema}


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool | None = None  # False: at most one tool call
    response_format: ResponseFormat | None = None  # after tool_choice: validated against it
    # The deprecated forms of tools and tool_choice.
    functions: UnsupportedList = None
    function_call: Annotated[Any, _refused_unless("none", "auto")] = None
    audio: Unsupported = None
    modalities: Annotated[Any, _refused_unless(["text"])] = None
    reasoning_effort: Unsupported = None
    verbosity: Unsupported = None
    web_search_options: Unsupported = None
    # Ignored: they cannot change the result.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("messages")
    @classmethod
    def _tool_results_answer_calls(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        called: set[str] = set()
        for position, message in enumerate(messages):
            called.update(call.id for call in message.tool_calls or [])
            if message.tool_call_id is not None and message.tool_call_id not in called:
                raise ValueError(
                    f"messages.{position}.tool_call_id '{message.tool_call_id}' answers no "
                    "tool call of an earlier assistant message"
                )
        return messages

    @field_validator("tools")
    @classmethod
    def _tool_names_differ(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or []]
        if len(set(names)) < len(names):
            raise ValueError("each tool needs a function name of its own")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: ToolChoice | None, info: ValidationInfo):
        names = [tool.function.name for tool in info.data.get("tools") or []]
        if choice not in (None, "none", "auto") and not names:
            raise ValueError("a tool_choice that calls a tool needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"'{choice.function.name}' is not the name of one of the tools")
        return choice

    @field_validator("response_format")
    @classmethod
    def _format_not_with_a_forced_call(
        cls, response_format: ResponseFormat | None, info: ValidationInfo
    ):
        choice = info.data.get("tool_choice")
        if response_format is not None and (
            choice == "required" or isinstance(choice, NamedToolChoice)
        ):
            raise ValueError(
                'response_format cannot shape a forced tool call: use tool_choice "auto" '
                "or drop response_format"
            )
        return response_format

    def calls_tools(self) -> bool:
        """Whether the model is offered tools (not with `tool_choice: "none"`)."""
        return bool(self.tools) and self.tool_choice != "none"

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling_options(self) -> dict[str, Any]:
        return {
            **super().sampling_options(),
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
            "structured_outputs": (
                self.response_format.structured_outputs() if self.response_format else None
            ),
        }


class ComputeUsage(BaseModel):
    """What the model really executed for this request (DESIGN.md §5)."""

    flops: int
    dense_flops: int
    saved_ratio: float
    kv_entries: int
    kv_entries_dense: int
    # Hybrids: bytes of recurrent state its linear layers held (constant per sequence; 0 without).
    state_bytes: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # served from vLLM's prefix cache: not executed, not billed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    compute: ComputeUsage | None = None


FinishReason = Literal["stop", "length", "tool_calls", "abort"] | None


class CompletionLogprobs(BaseModel):
    """Per token of the choice's text (the prompt's first, with `echo`): OpenAI's legacy shape.
    The first prompt token has no logprob (nothing precedes it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the assistant only calls tools
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _content_even_if_null(self, serialize: SerializerFunctionWrapHandler) -> dict:
        """`content` is always sent, as OpenAI sends it: null beside tool calls (the routes
        leave out other null fields)."""
        return {"content": None, **serialize(self)}


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None  # in the call's first delta
    arguments: str | None = None  # the next piece of the arguments' text


class ToolCallDelta(BaseModel):
    index: int  # which call of the message this piece belongs to
    id: str | None = None  # in the call's first delta, with `type`
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "subjective"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
