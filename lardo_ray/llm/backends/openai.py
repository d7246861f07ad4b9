"""OpenAI-compatible chat-completions backend: any ``/v1/chat/completions`` endpoint.

Works with hosted APIs (OpenAI and compatible providers) and local servers (``vllm serve``, ``transformers
serve``, llama.cpp, ...). Requests go through the ``openai`` SDK, which owns the protocol and the retry policy:
up to ``max_retries`` retries on timeouts, connection errors, HTTP 408/409/429 and 5xx, exponential back-off
from 0.5 s (doubling, capped at 8 s, with jitter), a server's ``Retry-After`` honoured up to 2 min. Other 4xx
answers (bad request, unknown model, auth) are not retried. What this module adds: a thread pool (up to
``concurrency`` requests in flight), a client-side rate limiter that spaces every attempt's start (an httpx
request hook, so retries are spaced too) to ``requests_per_second``, and per-row results: a request that
still fails gives a failed ``Generation`` whose ``error`` says why and after how many attempts; the row is
kept. Token counts come from the response's ``usage`` (0 when the server sends none).

``check()`` (run when the backend is built from the config) asks ``GET {base_url}/models`` first, so a wrong
``describe.openai.base_url`` or a missing key fails the stage at once, saying which setting to fix.
The API key is read from the env var named by ``describe.openai.api_key_env``; it may be absent (local
servers).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2  # the SDK's HTTP client (openai>=3)
import openai

from lardo_ray.llm.backends.base import Generation, LLMBackend, Messages
from lardo_ray.llm.settings import DescribeConfig, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# The SDK insists on a key; local servers take any. Sent only when no key is configured.
NO_KEY = "EMPTY"


class EndpointError(RuntimeError):
    """The endpoint cannot be used at all (wrong URL, server down, rejected key): raised by ``check()``."""


class RateLimiter:
    """Spaces request starts by ``1 / rate`` seconds (thread-safe); ``rate=None`` = no limit.

    Neither the SDK nor httpx limits a request rate, only connections; a provider's per-minute quota is
    a rate."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def _retryable(status: int) -> bool:
    """What the SDK retries (its ``_should_retry``): the error then says how many attempts it took."""
    return status in (408, 409, 429) or status >= 500


class OpenAIBackend(LLMBackend):
    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        requests_per_second: float | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        api_key_env: str = "OPENAI_API_KEY",
        extra_body: dict[str, Any] | None = None,
    ):
        super().__init__(model)
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key_env = api_key_env
        self.has_key = bool(api_key)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.extra_body = dict(extra_body or {})
        self.limiter = RateLimiter(requests_per_second)
        self._attempts = threading.local()  # per request: every attempt passes the request hook

        def on_request(request: Any) -> None:
            self.limiter.wait()
            self._attempts.n = getattr(self._attempts, "n", 0) + 1

        http = openai.DefaultHttpxClient(  # the SDK's client defaults, our pool size and hook
            limits=httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            event_hooks={"request": [on_request]},
        )
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or NO_KEY, timeout=timeout_s,
                                     max_retries=max_retries, http_client=http)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-backend")

    @classmethod
    def from_config(cls, cfg: DescribeConfig, check: bool = True) -> OpenAIBackend:
        o = cfg.openai
        backend = cls(
            cfg.model_name, base_url=o.base_url, api_key=os.environ.get(o.api_key_env) or None,
            concurrency=o.concurrency, requests_per_second=o.requests_per_second, timeout_s=o.timeout_s,
            max_retries=o.max_retries, api_key_env=o.api_key_env,
        )
        if check:
            try:
                backend.check()
            except Exception:
                backend.close()
                raise
        return backend

    # ------------------------------------------------------------------------------------------ check
    def check(self, attempts: int = 3) -> list[str]:
        """``GET {base_url}/models``: raises ``EndpointError`` naming the setting to fix; returns the model ids.

        A model missing from the listing is only logged: some servers (e.g. ``transformers serve``) serve
        models they do not list.
        """
        url = f"{self.base_url}/models"
        where = f"describe.openai.base_url = {self.base_url!r}"
        client = self._client.with_options(max_retries=attempts - 1, timeout=min(self.timeout_s, 10.0))
        try:
            ids = [m.id for m in client.models.list()]
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            has_key = "set" if self.has_key else "not set"
            raise EndpointError(
                f"{where}: GET {url} answered HTTP {e.status_code} (key rejected or missing; the env var named "
                f"by describe.openai.api_key_env, {self.api_key_env}, is {has_key}): {_short(e.response.text)}"
            ) from e
        except openai.APIStatusError as e:
            if _retryable(e.status_code):
                raise EndpointError(f"{where}: GET {url} kept answering HTTP {e.status_code} after {attempts} "
                                    f"attempts: {_short(e.response.text)}") from e
            raise EndpointError(
                f"{where}: GET {url} answered HTTP {e.status_code}; is this an OpenAI-compatible base URL "
                f"(it usually ends in /v1)? {_short(e.response.text)}"
            ) from e
        except openai.APIConnectionError as e:  # timeouts included
            raise EndpointError(
                f"{where}: the endpoint does not answer GET {url} ({type(e).__name__}: {e}). Start the server, "
                f"or fix describe.openai.base_url."
            ) from e
        except Exception as e:  # noqa: BLE001 - a 200 that is not a model list
            raise EndpointError(f"{where}: GET {url} did not return a model list: {type(e).__name__}: {e}") from e
        if ids and self.model not in ids:
            log.warning("describe.model %r is not among the models listed by %s: %s", self.model, url, ids[:20])
        return [i for i in ids if i]

    # ------------------------------------------------------------------------------------------ requests
    def _one(self, messages: Messages, sampling: SamplingParams) -> Generation:
        t0 = time.perf_counter()
        self._attempts.n = 0
        try:
            chat = [{"role": m["role"], "content": m["content"]} for m in messages]
        except Exception as e:  # noqa: BLE001
            return Generation.failed(f"bad prompt: {type(e).__name__}: {e}")
        try:
            resp = self._client.chat.completions.create(
                model=self.model, messages=chat,  # type: ignore[arg-type]  # plain role/content dicts
                max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                seed=sampling.seed if sampling.seed is not None else openai.NOT_GIVEN,
                extra_body=self.extra_body or None,
            )
        except openai.APITimeoutError as e:
            return self._failed(f"timeout after {self.timeout_s:g} s ({type(e).__name__})", True, t0)
        except openai.APIConnectionError as e:
            return self._failed(f"connection error: {type(e).__name__}: {_short(str(e), 200)}", True, t0)
        except openai.APIStatusError as e:
            return self._failed(f"HTTP {e.status_code}: {_short(e.response.text)}", _retryable(e.status_code), t0)
        except Exception as e:  # noqa: BLE001 - an answer the SDK could not read, or a bug: the row keeps it
            return self._failed(f"request failed: {type(e).__name__}: {_short(str(e), 200)}", False, t0)
        latency = time.perf_counter() - t0
        usage = resp.usage
        ptok = int(usage.prompt_tokens or 0) if usage else 0
        ctok = int(usage.completion_tokens or 0) if usage else 0
        if not resp.choices:
            return Generation(None, ptok, ctok, latency, error="no choices in the answer")
        text = (resp.choices[0].message.content or "").strip()
        if not text:
            return Generation(None, ptok, ctok, latency, error="empty completion")
        return Generation(text, ptok, ctok, latency)

    def _failed(self, why: str, retried: bool, t0: float) -> Generation:
        n = getattr(self._attempts, "n", 1)
        return Generation.failed(f"failed after {n} attempts: {why}" if retried else why, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------ interface
    def generate(self, prompts: list[Messages], sampling: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        futures = [self._pool.submit(self._one, msgs, sampling) for msgs in prompts]
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001 - _one catches everything; this is belt and braces
                out.append(Generation.failed(f"request failed: {type(e).__name__}: {e}"))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r})"
