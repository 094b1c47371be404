"""OpenAI `/v1/completions` requests and responses, following vLLM's conventions.

`parse_completion` turns a JSON body into sampling parameters, or raises `ApiError` with an
HTTP status and a message naming the field. Every field is treated as hostile: types are
checked exactly (a bool is not an int), numbers must be finite and in range.

Extensions (as vLLM has `ignore_eos`, `top_k`): `ignore_eos`, `top_k`, and
`engram: {"knockout": bool, "return_gates": bool}` -- the memory knockout and gate read-out.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from worker.sequence import EngramOptions, SamplingParams, TokenEvent

MAX_LOGPROBS = 20
MAX_STOPS = 16
DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    @property
    def type(self) -> str:
        return {
            400: "BadRequestError",
            404: "NotFoundError",
            429: "RateLimitError",
            503: "ServiceUnavailableError",
        }.get(self.status, "InternalServerError")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


@dataclass(slots=True)
class CompletionRequest:
    prompt_text: str | None  # None when the prompt came as token ids
    prompt_ids: list[int] | None
    params: SamplingParams
    options: EngramOptions
    stream: bool
    include_usage: bool


def _bad(field: str, msg: str) -> ApiError:
    return ApiError(400, f"{field}: {msg}", param=field)


def _int(body: dict[str, Any], field: str, default: int | None) -> int | None:
    v = body.get(field, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(field, f"expected an integer, got {v!r}")
    return v


def _num(body: dict[str, Any], field: str, default: float) -> float:
    v = body.get(field, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(field, f"expected a finite number, got {v!r}")
    return float(v)


def _prompt(body: dict[str, Any], num_tokens: int) -> tuple[str | None, list[int] | None]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise _bad("prompt", "empty")
        return p, None
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not p:
            raise _bad("prompt", "empty")
        bad = [t for t in p if not 0 <= t < num_tokens]
        if bad:
            raise _bad("prompt", f"token ids must be in [0, {num_tokens}), got {bad[:5]}")
        return None, list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise _bad("prompt", f"a batch of {len(p)} prompts; this server takes one prompt per request")
    if p is None:
        raise _bad("prompt", "missing (a string or a list of token ids)")
    raise _bad("prompt", f"expected a string or a list of token ids, got {type(p).__name__}")


def parse_completion(body: Any, *, model_name: str, max_new_tokens: int, num_tokens: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise ApiError(400, f"request body: expected a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", f"missing or not a string (this server serves {model_name!r})")
    if model != model_name:
        raise ApiError(404, f"The model `{model}` does not exist (this server serves `{model_name}`).", param="model")
    text, ids = _prompt(body, num_tokens)
    max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS)
    assert max_tokens is not None
    if not 1 <= max_tokens <= max_new_tokens:
        raise _bad("max_tokens", f"must be in 1..{max_new_tokens} (worker.max_new_tokens), got {max_tokens}")
    temperature = _num(body, "temperature", 1.0)
    if temperature < 0:
        raise _bad("temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    top_p = _num(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise _bad("top_p", f"must be in (0, 1], got {top_p}")
    top_k = _int(body, "top_k", -1)
    assert top_k is not None
    if top_k < -1:
        raise _bad("top_k", f"must be -1 or 0 (off) or a positive integer, got {top_k}")
    seed = _int(body, "seed", None)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    elif not 0 <= seed < 2**63:
        raise _bad("seed", f"must be in [0, 2**63), got {seed}")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise _bad("stop", f"expected a string or a list of at most {MAX_STOPS} strings, got {stop!r}")
    logprobs = _int(body, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise _bad("logprobs", f"must be in 0..{MAX_LOGPROBS}, got {logprobs}")
    n = _int(body, "n", 1)
    if n != 1:
        raise _bad("n", f"only n=1 is supported, got {n}")
    best_of = _int(body, "best_of", None)
    if best_of not in (None, 1):
        raise _bad("best_of", f"only best_of=1 is supported, got {best_of}")
    if body.get("echo") not in (None, False):
        raise _bad("echo", "echo of the prompt is not supported")
    if body.get("suffix") is not None:
        raise _bad("suffix", "suffix is not supported")
    for field in ("presence_penalty", "frequency_penalty"):
        if _num(body, field, 0.0) != 0.0:
            raise _bad(field, "penalties are not supported (0 only)")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "not supported")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", f"expected true or false, got {stream!r}")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
        raise _bad("stream_options", f'expected {{"include_usage": bool}}, got {so!r}')
    ignore = body.get("ignore_eos", False)
    if not isinstance(ignore, bool):
        raise _bad("ignore_eos", f"expected true or false, got {ignore!r}")
    return CompletionRequest(
        prompt_text=text,
        prompt_ids=ids,
        stream=stream,
        include_usage=bool(so.get("include_usage", False)),
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=max(0, top_k),
            seed=seed,
            stop=stops,
            logprobs=logprobs,
            ignore_eot=ignore,
        ),
        options=parse_engram(body.get("engram")),
    )


def parse_engram(value: Any) -> EngramOptions:
    if value is None:
        return EngramOptions()
    if not isinstance(value, dict):
        raise _bad("engram", f'expected an object like {{"knockout": true, "return_gates": true}}, got {value!r}')
    unknown = set(value) - {"knockout", "return_gates"}
    if unknown:
        raise _bad("engram", f"unknown option(s) {sorted(unknown)} (known: knockout, return_gates)")
    for k, v in value.items():
        if not isinstance(v, bool):
            raise _bad(f"engram.{k}", f"expected true or false, got {v!r}")
    return EngramOptions(knockout=value.get("knockout", False), return_gates=value.get("return_gates", False))


# ---------------------------------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class LogprobsBuilder:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, token_text: Any) -> None:
        self.token_text = token_text  # id -> str
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top: list[dict[str, float]] = []
        self.offsets: list[int] = []

    def add(self, ev: TokenEvent, offset: int) -> dict[str, Any]:
        tok = self.token_text(ev.token_id)
        top = {self.token_text(i): lp for i, lp in (ev.top_logprobs or [])}
        self.tokens.append(tok)
        self.token_logprobs.append(ev.logprob)
        self.top.append(top)
        self.offsets.append(offset)
        return {"tokens": [tok], "token_logprobs": [ev.logprob], "top_logprobs": [top], "text_offset": [offset]}

    def whole(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top,
            "text_offset": self.offsets,
        }


def chunk(
    cid: str, created: int, model: str, *, choice: dict[str, Any] | None, usage: dict[str, int] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice] if choice is not None else [],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def now() -> int:
    return int(time.time())
