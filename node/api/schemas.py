"""OpenAI request and response shapes (the subset a node serves), plus loranode's receipt field.

Every field declared on a request is honoured; the request fields this node does not apply are
refused with a 400 naming them (node/api/request_fields.py), and so is any field it does not know.
`response_format`, `tools` and `tool_choice` are chat fields (node/api/structured.py turns them into
the grammar the answer must match).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from node.engine.sampling import (
    MAX_CACHE_SALT_LENGTH,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_PENALTY,
    REPETITION_PENALTY_RANGE,
)

MAX_STOP_STRINGS = 8
MAX_CHOICES = 16  # n: the most choices one request may ask for (all of them paid for)
MAX_LOGIT_BIAS_ENTRIES = 1024
StopString = Annotated[str, Field(min_length=1)]
Penalty = Annotated[float | None, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(default=None, description="usage is always in the last chunk")
    include_obfuscation: Literal[False] | None = None  # not applied: refused when true


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # what is left over is refused (request_fields.py)

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, lt=2**31)  # above any vocabulary; bounded so the engine can hold it
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1, le=MAX_CHOICES, description="choices, each paid for")
    # penalties and bias (node/engine/penalty.py); repetition_penalty and min_tokens as vLLM names them
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    repetition_penalty: float | None = Field(default=None, ge=REPETITION_PENALTY_RANGE[0],
                                             le=REPETITION_PENALTY_RANGE[1])
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS_ENTRIES, description="token id (decimal string) -> bias")
    min_tokens: int | None = Field(default=None, ge=0)
    # as vLLM names it: only requests with the same salt (and model) share prefix-cache blocks (docs/security.md)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_LENGTH)
    # labels: accepted, they change nothing in the answer (a random `user` adds entropy to the body)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        return [v] if isinstance(v, str) else v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"logit_bias keys are token ids as decimal strings, not {key[:20]!r}")
        return v

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])  # normalised to a list by the validator

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @property
    def num_logprobs(self) -> int | None:
        """None: no logprobs; k: the sampled token's and the k most likely."""
        return None


class CompletionRequest(_Request):
    # the schema states the bound on each branch: on the union, `minLength` would say nothing of a list
    prompt: str | list[int] = Field(json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "integer"}, "minItems": 1}]})

    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="the k most likely per token")

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_render_chars(self) -> int:
        """The prompt's characters (or token ids): what tokenizing it costs."""
        return len(self.prompt)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v: str | list[int]) -> str | list[int]:
        if not v:
            raise ValueError("the prompt is empty")
        return v


class TextPart(BaseModel):
    """A content part: only text is served."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
JSONSchemaObject = dict[str, Any]


class FunctionCall(BaseModel):
    name: FunctionName
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]


class UserMessage(_Message):
    role: Literal["user"]


class AssistantTurn(_Message):
    """An earlier assistant answer: text, tool calls, or both."""

    role: Literal["assistant"]
    content: str | list[TextPart] | None = None  # type: ignore[assignment]  # null beside tool_calls
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Message):
    """A tool's answer to one of the assistant's calls."""

    role: Literal["tool"]
    tool_call_id: str = Field(min_length=1, max_length=128)


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: FunctionName
    description: str | None = None
    schema_: JSONSchemaObject = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    type: Literal["text", "json_object"]


class SchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[TextFormat | SchemaFormat, Field(discriminator="type")]


class FunctionDefinition(BaseModel):
    name: FunctionName
    description: str | None = None
    parameters: JSONSchemaObject = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


MAX_TOOLS = 128
RENDERED_ITEM_CHARS = 64  # a chat message, tool call or tool counts as this many characters to render


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tools_agree(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools have the same name")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool is named {self.tool_choice.function.name}")
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice: it asks for a tool call but no tools are given")
        if self.calls_tools and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: a JSON answer and tool calls cannot both be required; "
                             "send tool_choice none, or no response_format")
        return self

    @property
    def calls_tools(self) -> bool:
        """The answer may (or must) be tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_render_chars(self) -> int:
        """What the chat template has to render, in characters: the messages' text, and RENDERED_ITEM_CHARS
        for each message, tool call and tool (a template's work grows with them, text or not)."""
        calls = sum(len(m.tool_calls or []) for m in self.messages if isinstance(m, AssistantTurn))
        num_items = len(self.messages) + calls + len(self.tools or [])
        return sum(len(m.text()) for m in self.messages) + RENDERED_ITEM_CHARS * num_items


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SignedReceipt(BaseModel):
    """The node's EIP-712 Receipt (all integers as decimal strings, hashes as 0x-hex) and its signature."""

    id: str
    voucherHash: str
    adapterId: str
    registryBlock: int
    lineageHash: str
    promptTokens: int
    completionTokens: int
    fee: str
    outputHash: str
    method: int
    signature: str
    node: str
    chargedTotal: str


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    receipt: SignedReceipt


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    receipt: SignedReceipt


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None
    details: dict[str, Any] | None = None  # the error's facts (NodeError.to_dict)


class ErrorResponse(BaseModel):
    error: ErrorBody
