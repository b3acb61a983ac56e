"""End-to-end test of the example collector against `tokenbroker dev`.

Starts `tokenbroker dev` (broker + embedded emulator) as a subprocess, runs the collector as a
subprocess for a tenant, and checks with the emulator's admin counters and the records that
every page was read, each with a token the emulated Graph accepted. Run through
examples/collector/run-test.sh (TOKENBROKER_BIN: the binary, default target/debug/tokenbroker).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import requests

import collector

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
COLLECTOR = HERE / "collector.py"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
RUN_TIMEOUT = 120.0
# Proxies and CA overrides from the environment must not change what is tested.
SCRUBBED_ENV = (
    "http_proxy", "https_proxy", "all_proxy", "grpc_proxy",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
    "TOKENBROKER_ADDR", "COLLECTOR_TENANT", "GRAPH_BASE_URL", "GRAPH_CA_FILE",
)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Dev:
    def __init__(self, proc: subprocess.Popen, port: int, state: Path, log: Path):
        self.proc = proc
        self.port = port
        self.state = state
        self.log = log
        self.endpoints = json.loads((state / "endpoints.json").read_text())
        broker = tomllib.loads((state / "broker.toml").read_text())
        self.tenant_ids = {name: t["tenant_id"] for name, t in broker["tenants"].items()}

    @property
    def graph_base(self) -> str:
        # The Graph-style route lives on the emulator's HTTPS listener (the authority host).
        return f"{self.endpoints['authority_host']}/graph/v1.0"

    def admin(self, method: str, path: str, body: dict | None = None) -> requests.Response:
        r = requests.request(method, self.endpoints["admin_url"] + path, json=body, timeout=10,
                             proxies={"http": None, "https": None})
        r.raise_for_status()
        return r

    def counters(self) -> dict:
        return self.admin("GET", "/counters").json()


def start_dev(tmp: Path) -> Dev:
    binary = Path(os.environ.get("TOKENBROKER_BIN", REPO / "target/debug/tokenbroker"))
    if not binary.is_file():
        pytest.fail(f"{binary} not found: build it (cargo build) or set TOKENBROKER_BIN")
    port = free_port()
    state = tmp / "dev-state"
    log = tmp / "dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(binary), "dev", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean_env(),
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tokenbroker dev exited with {proc.returncode}:\n{log.read_text()}")
        if (state / "endpoints.json").is_file() and accepts(port):
            return Dev(proc, port, state, log)
        time.sleep(0.2)
    stop(proc)
    pytest.fail(f"tokenbroker dev not ready within {START_TIMEOUT}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM, bounded wait; SIGKILL (this process only) if it does not stop."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
            return -9
    return proc.returncode


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    d = start_dev(tmp_path_factory.mktemp("collector"))
    yield d
    code = stop(d.proc)
    assert code == 0, f"tokenbroker dev did not stop cleanly on SIGTERM ({code}):\n{d.log.read_text()}"


@pytest.fixture
def fresh(dev):
    """Counters and faults cleared before each test (the broker's cache is kept)."""
    dev.admin("DELETE", "/faults")
    dev.admin("POST", "/counters/reset")
    return dev


def run_collector(dev: Dev, tmp: Path, tenant: str, *extra: str, ca: bool = True):
    out = tmp / f"{tenant}.jsonl"
    args = [
        sys.executable, str(COLLECTOR),
        "--broker", f"http://127.0.0.1:{dev.port}",
        "--tenant", tenant,
        "--graph-base", dev.graph_base,
        "--out", str(out),
        *extra,
    ]
    if ca:
        args += ["--ca-file", dev.endpoints["ca_cert"]]
    p = subprocess.run(args, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=clean_env())
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    summary = None
    for line in p.stderr.splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
    return p, records, summary


def assert_every_page_read(dev: Dev, tenant: str, records: list, summary: dict, total: int, top: int):
    tid = dev.tenant_ids[tenant]
    pages = -(-total // top)
    ids = [r["id"] for r in records]
    assert len(records) == total
    assert len(set(ids)) == total, "record ids are distinct"
    assert all(r["resourceTenantId"] == tid for r in records)
    # Newest first, one a minute apart: no page skipped or read twice.
    times = [r["createdDateTime"] for r in records]
    assert times == sorted(times, reverse=True) and len(set(times)) == total
    assert summary["pages"] == pages and summary["records"] == total
    # Every Graph request the emulator answered itself validated the token (signature,
    # audience, lifetime, tenant): all succeeded, one per page, none without a valid token.
    graph = dev.counters()["graph"]
    assert graph[tid] == {"total": pages, "success": pages, "failure": 0}, graph
    assert "-" not in graph, graph


def test_collects_every_page_with_a_broker_token(fresh, tmp_path):
    p, records, summary = run_collector(fresh, tmp_path, "contoso")
    assert p.returncode == 0, p.stderr
    assert_every_page_read(fresh, "contoso", records, summary, total=35, top=10)
    assert summary["unauthorized"] == 0
    assert summary["token_requests"] == 1
    assert fresh.counters()["routes"]["graph.list"] == {"total": 4, "success": 4, "failure": 0}


def test_reasks_the_broker_on_401(fresh, tmp_path):
    tid = fresh.tenant_ids["contoso"]
    expired = {"error": {"code": "InvalidAuthenticationToken",
                         "message": "Lifetime validation failed, the token is expired."}}
    fault = {"route": "graph", "tenant": tid, "count": 1,
             "fail": {"status": 401, "body": expired}}
    assert fresh.admin("POST", "/faults", fault).status_code == 201
    p, records, summary = run_collector(fresh, tmp_path, "contoso", "--top", "7")
    assert p.returncode == 0, p.stderr
    assert summary["unauthorized"] == 1
    assert summary["token_requests"] == 2, "asked the broker again after the 401"
    assert_every_page_read(fresh, "contoso", records, summary, total=35, top=7)
    assert fresh.counters()["routes"]["graph.list"] == {"total": 6, "success": 5, "failure": 1}


def test_other_tenant_gets_its_own_log(fresh, tmp_path):
    p, records, summary = run_collector(fresh, tmp_path, "fabrikam", "--top", "5")
    assert p.returncode == 0, p.stderr
    assert_every_page_read(fresh, "fabrikam", records, summary, total=12, top=5)


def test_tls_is_verified_against_the_emulator_ca(fresh, tmp_path):
    # Without the emulator's CA the certificate is not trusted: the collector fails, it does
    # not fall back to an unverified connection.
    p, records, _ = run_collector(fresh, tmp_path, "contoso", ca=False)
    assert p.returncode == 1
    assert "TLS verification" in p.stderr
    assert records == []
    assert fresh.counters()["graph"] == {}


def test_unknown_tenant_is_refused_by_the_broker(fresh, tmp_path):
    p, records, _ = run_collector(fresh, tmp_path, "nosuchtenant")
    assert p.returncode == 1
    assert "NOT_FOUND" in p.stderr, p.stderr
    assert records == []


def test_next_link_must_stay_on_the_same_origin():
    assert collector.same_origin("https://h:1/a?x", "https://H:1/b")
    assert not collector.same_origin("https://h:1/a", "https://h:2/a")
    assert not collector.same_origin("https://h:1/a", "http://h:1/a")
    assert not collector.same_origin("https://evil.example/a", "https://h/a")


def test_plaintext_bearer_only_to_loopback():
    assert collector.is_loopback("127.0.0.1") and collector.is_loopback("[::1]")
    assert collector.is_loopback("localhost") and not collector.is_loopback("broker.internal")
    auth = collector.BrokerAuth(bearer_file="/dev/null")
    with pytest.raises(collector.CollectorError, match="non-loopback"):
        collector.BrokerTokens("http://broker.internal:50051", "t", collector.GRAPH_SCOPE, auth, 5)
