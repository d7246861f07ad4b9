"""OpenAI-compatible chat-completions backend: any ``/v1/chat/completions`` endpoint.

Works with hosted APIs (OpenAI and compatible providers) and local servers (``vllm serve``, ``transformers
serve``, llama.cpp, ...). Plain ``httpx`` (no OpenAI SDK needed, no SDK-side retries): requests run on a
thread pool, up to ``concurrency`` in flight; a client-side rate limiter spaces request starts (retries
included) to ``requests_per_second``; each request has a ``timeout_s`` timeout.

Retries (up to ``max_retries``, back-off ``backoff_s`` doubled each time, ``Retry-After`` honoured) on
timeouts, connection errors, HTTP 429 and 5xx. Other 4xx answers (bad request, unknown model, auth) are not
retried. A request that still fails gives a failed ``Generation`` whose ``error`` says why; the row is kept.
Token counts come from the response's ``usage`` (0 when the server sends none).

``check()`` (run when the backend is built from the config) asks ``GET {base_url}/models`` first, so a wrong
``describe.openai.base_url`` or a missing key fails the stage at once, saying which setting to fix.
The API key is read from the env var named by ``describe.openai.api_key_env``; it may be absent (local
servers).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from lardo_ray.llm.backends.base import Generation, LLMBackend, Messages
from lardo_ray.llm.settings import DescribeConfig, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
MAX_BACKOFF_S = 60.0


class EndpointError(RuntimeError):
    """The endpoint cannot be used at all (wrong URL, server down, rejected key): raised by ``check()``."""


class RateLimiter:
    """Spaces request starts by ``1 / rate`` seconds (thread-safe); ``rate=None`` = no limit."""

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


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: fall back to our own back-off


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


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
        backoff_s: float = 2.0,
        api_key_env: str = "OPENAI_API_KEY",
        extra_body: dict | None = None,
    ):
        super().__init__(model)
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.extra_body = dict(extra_body or {})
        self.limiter = RateLimiter(requests_per_second)
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-backend")

    @classmethod
    def from_config(cls, cfg: DescribeConfig, check: bool = True) -> "OpenAIBackend":
        o = cfg.openai
        backend = cls(
            cfg.model_name, base_url=o.base_url, api_key=os.environ.get(o.api_key_env) or None,
            concurrency=o.concurrency, requests_per_second=o.requests_per_second, timeout_s=o.timeout_s,
            max_retries=o.max_retries, backoff_s=o.backoff_s, api_key_env=o.api_key_env,
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
        last = ""
        for i in range(attempts):
            try:
                resp = self._client.get(url, timeout=min(self.timeout_s, 10.0))
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                time.sleep(min(0.5 * 2**i, 2.0))
                continue
            if resp.status_code in (401, 403):
                has_key = "set" if "Authorization" in self._client.headers else "not set"
                raise EndpointError(
                    f"{where}: GET {url} answered HTTP {resp.status_code} (key rejected or missing; the env var "
                    f"named by describe.openai.api_key_env, {self.api_key_env}, is {has_key}): {_short(resp.text)}"
                )
            if resp.status_code >= 500 or resp.status_code == 429:
                last = f"HTTP {resp.status_code}: {_short(resp.text)}"
                time.sleep(min(0.5 * 2**i, 2.0))
                continue
            if resp.status_code != 200:
                raise EndpointError(
                    f"{where}: GET {url} answered HTTP {resp.status_code}; is this an OpenAI-compatible base URL "
                    f"(it usually ends in /v1)? {_short(resp.text)}"
                )
            try:
                ids = [m.get("id") for m in resp.json().get("data", []) if isinstance(m, dict)]
            except Exception as e:  # noqa: BLE001
                raise EndpointError(f"{where}: GET {url} did not return a model list: {e}") from e
            if ids and self.model not in ids:
                log.warning("describe.model %r is not among the models listed by %s: %s", self.model, url,
                            ids[:20])
            return [i for i in ids if i]
        raise EndpointError(
            f"{where}: the endpoint does not answer GET {url} ({last}). Start the server, or fix "
            f"describe.openai.base_url."
        )

    # ------------------------------------------------------------------------------------------ requests
    def _body(self, messages: Messages, sampling: SamplingParams) -> dict:
        body = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stream": False,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        body.update(self.extra_body)
        return body

    def _backoff(self, attempt: int, hint: float | None) -> float:
        delay = self.backoff_s * (2**attempt)
        if hint is not None:
            delay = max(delay, hint)
        delay = min(delay, MAX_BACKOFF_S)
        return delay * (1.0 + 0.1 * random.random())  # a little jitter: retries of a burst do not align

    def _one(self, messages: Messages, sampling: SamplingParams) -> Generation:
        t0 = time.perf_counter()
        try:
            body = self._body(messages, sampling)
        except Exception as e:  # noqa: BLE001
            return Generation.failed(f"bad prompt: {type(e).__name__}: {e}")
        url = f"{self.base_url}/chat/completions"
        last = ""
        attempts = 0
        for attempt in range(self.max_retries + 1):
            attempts = attempt + 1
            self.limiter.wait()
            hint = None
            try:
                resp = self._client.post(url, json=body)
            except httpx.TimeoutException as e:
                last = f"timeout after {self.timeout_s:g} s ({type(e).__name__})"
            except httpx.TransportError as e:
                last = f"connection error: {type(e).__name__}: {_short(str(e), 200)}"
            except Exception as e:  # noqa: BLE001 - anything else is not worth a retry
                return Generation.failed(f"request failed: {type(e).__name__}: {_short(str(e), 200)}",
                                         time.perf_counter() - t0)
            else:
                status = resp.status_code
                if status == 200:
                    return self._parse(resp, time.perf_counter() - t0)
                last = f"HTTP {status}: {_short(resp.text)}"
                if status not in RETRY_STATUS and status < 500:
                    return Generation.failed(last, time.perf_counter() - t0)  # 4xx: retrying will not help
                hint = _retry_after(resp)
            if attempt < self.max_retries:
                time.sleep(self._backoff(attempt, hint))
        return Generation.failed(f"failed after {attempts} attempts: {last}", time.perf_counter() - t0)

    @staticmethod
    def _parse(resp: httpx.Response, latency: float) -> Generation:
        try:
            data = resp.json()
            usage = data.get("usage") or {}
            ptok = int(usage.get("prompt_tokens") or 0)
            ctok = int(usage.get("completion_tokens") or 0)
            choices = data.get("choices") or []
            if not choices:
                return Generation(None, ptok, ctok, latency, error=f"no choices in the answer: {_short(resp.text)}")
            text = ((choices[0].get("message") or {}).get("content") or "").strip()
        except Exception as e:  # noqa: BLE001
            return Generation.failed(f"unparsable answer: {type(e).__name__}: {_short(resp.text, 200)}", latency)
        if not text:
            return Generation(None, ptok, ctok, latency, error="empty completion")
        return Generation(text, ptok, ctok, latency)

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
