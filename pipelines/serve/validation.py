"""Request validation for the HTTP API: every bad request becomes a `RequestError` (a 4xx status
and a message for the client), never a 500 and never an exception inside a replica's batch.

The body shape follows the OpenAI Images API (`prompt`, `n`, `size`, `response_format`) plus a
`seed` extension; limits (`n`, prompt length) come from the pipeline definition's `serve` section.
"""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts any non-negative int64
MAX_BODY_BYTES = 64 * 1024
MAX_DEPTH = 32  # nesting of the JSON body: no field needs more, and deeper values only cost recursion
MAX_INT_DIGITS = 40  # longer integer literals are refused by name (Python refuses > 4300 digits with a ValueError)
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel = 60, 60, 3


class RequestError(Exception):
    """A client error: HTTP `status` with a message that says what to change."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        # OpenAI's error shape, so OpenAI clients surface the message.
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": self.status}}


@dataclass(frozen=True)
class Limits:
    max_images: int
    max_prompt_chars: int
    sizes: tuple[str, ...]  # e.g. ("64x64",): the served model's output size


# Fields of OpenAI's images API that have no meaning for this model: accepted (clients send
# them), not applied, and named in the response's X-SWD-Ignored header.
NOT_APPLIED = ("quality", "style", "background", "moderation", "output_compression", "partial_images", "stream")


class ImageRequest(BaseModel):
    """`POST /v1/images/generations` body. The fields OpenAI's images API defines are accepted:
    those that apply are applied, the others (NOT_APPLIED, an `output_format` other than png)
    are listed by `ignored`. Unknown fields are refused so typos ("prompts") are not silently
    ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    n: StrictInt = 1
    size: StrictStr | None = Field(default=None, validate_default=True)  # default: the model's first size
    response_format: Literal["b64_json"] = "b64_json"
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    model: StrictStr | None = None
    user: StrictStr | None = None
    output_format: StrictStr | None = None  # png is what this server returns
    quality: Any = None
    style: Any = None
    background: Any = None
    moderation: Any = None
    output_compression: Any = None
    partial_images: Any = None
    stream: Any = None

    @property
    def ignored(self) -> list[str]:
        """The fields the client set that this server does not apply."""
        out = [f for f in NOT_APPLIED if f in self.model_fields_set]
        if self.output_format not in (None, "png"):
            out.append("output_format")
        return out

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        limits: Limits = info.context["limits"]
        v = v.strip()
        if not v:
            raise ValueError("prompt is empty")
        if len(v) > limits.max_prompt_chars:
            raise ValueError(f"prompt is {len(v)} characters; the limit is {limits.max_prompt_chars}")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int, info: ValidationInfo) -> int:
        limits: Limits = info.context["limits"]
        if not 1 <= v <= limits.max_images:
            raise ValueError(f"n must be between 1 and {limits.max_images}, got {v}")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None, info: ValidationInfo) -> str:
        sizes = info.context["limits"].sizes
        if v is None:
            return sizes[0]
        if v not in sizes:
            raise ValueError(f"size {v!r} is not supported by this model; supported: {', '.join(sizes)}")
        return v


def _describe(err: ValidationError) -> tuple[str, str | None]:
    """One readable line per problem ("n: n must be between 1 and 4, got 9")."""
    lines, first = [], None
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "body"
        first = first or field
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field; allowed: {', '.join(ImageRequest.model_fields)}"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] in ("int_type", "int_from_float"):
            msg = f"must be an integer, got {_short.repr(e.get('input'))}"
        lines.append(f"{field}: {msg}")
    return "; ".join(lines), first


class _LongInt:
    """An integer literal of more than MAX_INT_DIGITS digits, kept unconverted until it is refused."""

    def __init__(self, digits: int):
        self.digits = digits


def _int_literal(text: str):
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else _LongInt(len(text.lstrip("-")))


def _shown(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode()


def _check_values(data: dict) -> None:
    """Refuse, naming the top-level field, what the model or the response could not handle:
    strings that are not valid Unicode (lone surrogates: UTF-8 cannot encode them, so the tokenizer
    fails on them), integers too long to convert, nesting deeper than MAX_DEPTH. Iterative, so no
    body can exhaust the stack here."""
    stack = [(key, value, 1) for key, value in data.items()]
    while stack:
        field, value, depth = stack.pop()
        keys = [] if not isinstance(value, dict) else list(value)
        for text in (field, *keys, *([value] if isinstance(value, str) else [])):
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise RequestError(400, f"{_shown(field)}: not valid Unicode: "
                                            f"{err.object[err.start:err.end]!r} at "
                                            f"character {err.start} (a lone surrogate)", _shown(field)) from None
        if isinstance(value, _LongInt):
            raise RequestError(400, f"{_shown(field)}: a {value.digits}-digit integer is out of range", _shown(field))
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise RequestError(400, f"{_shown(field)}: nested more than {MAX_DEPTH} levels deep", _shown(field))
            items = value.values() if isinstance(value, dict) else value
            stack.extend((field, item, depth + 1) for item in items)


def validate_fields(data: dict, limits: Limits) -> ImageRequest:
    _check_values(data)
    try:
        return ImageRequest.model_validate(data, context={"limits": limits})
    except ValidationError as err:
        message, param = _describe(err)
        raise RequestError(400, message, param) from None


async def read_limited_body(headers, stream, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused before it is buffered: by its Content-Length when it declares
    one, else (chunked) as soon as the bytes read pass `limit`; the rest is never read."""
    length = headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise RequestError(400, f"Content-Length {length!r} is not a number") from None
        if declared > limit:
            raise RequestError(413, f"request body is {declared} bytes (Content-Length); the limit is {limit}")
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes (stopped reading there)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_request(body: bytes, content_type: str | None, limits: Limits) -> ImageRequest:
    """The POST body: JSON only (415 otherwise), well-formed (400), an object of valid fields (400)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise RequestError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    decoder = json.JSONDecoder(parse_int=_int_literal)
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads decodes bytes
        data = decoder.decode(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"malformed JSON body: {err}") from None
    except RecursionError:
        field = _deepest_field(text, decoder)
        raise RequestError(400, f"{field}: nested more than {MAX_DEPTH} levels deep", field) from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the JSON body must be an object, got {type(data).__name__}")
    return validate_fields(data, limits)


def _deepest_field(text: str, decoder: json.JSONDecoder) -> str:
    """The top-level field whose value nests too deep for the JSON parser ("body" when the body is
    not an object of such fields): each value is parsed on its own, keys (flat strings) too."""
    space = re.compile(r"\s*")
    i = space.match(text).end()
    if text[i:i + 1] != "{":
        return "body"
    try:
        while True:
            key, i = decoder.raw_decode(text, space.match(text, i + 1).end())
            i = space.match(text, i).end() + 1  # past ':'
            try:
                _, i = decoder.raw_decode(text, space.match(text, i).end())
            except RecursionError:
                return _shown(key) if isinstance(key, str) else "body"
            i = space.match(text, i).end()  # at ',' (or '}')
    except (ValueError, IndexError):
        return "body"


def parse_query_request(prompt: str | None, seed: str | None, size: str | None, limits: Limits) -> ImageRequest:
    """`GET /generate?prompt=...&seed=...`: query values are strings, so the seed is parsed here
    (an integer literal only: "1.5", "1e3" and "abc" are refused rather than coerced)."""
    data: dict = {"prompt": prompt} if prompt is not None else {}
    if seed is not None:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", seed):
            raise RequestError(400, f"seed: must be an integer, got {_short.repr(seed)}", "seed")
        data["seed"] = _int_literal(seed.strip().lstrip("+"))
    if size is not None:
        data["size"] = size
    return validate_fields(data, limits)
