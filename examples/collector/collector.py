#!/usr/bin/env python3
"""Example log collector: Microsoft Graph sign-in logs for one tenant, with a token from tokenbroker.

Instead of reading a client secret for the tenant from a parameter store and running the OAuth
client-credentials flow itself, the collector asks the broker over gRPC for a Graph token
(`GetToken`), pages through a Graph list endpoint following `@odata.nextLink`, and writes each
record as one JSON line. When Graph answers 401 (the token expired or was revoked), it asks the
broker again instead of keeping any credential of its own.

    collector.py --broker http://127.0.0.1:50051 --tenant contoso \\
        --graph-base https://127.0.0.1:PORT/graph/v1.0 --ca-file .tokenbroker-dev/ca.pem

Every option can also come from the environment (see --help). The gRPC stubs are generated
from proto/tokenbroker/v1/broker.proto with grpcio-tools into examples/collector/_generated/
(git-ignored) the first time they are needed, or with --generate-stubs at setup time.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import ipaddress
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import grpc
import requests

HERE = Path(__file__).resolve().parent
DEFAULT_PROTO_ROOT = HERE.parent.parent / "proto"
PROTO_FILE = "tokenbroker/v1/broker.proto"
GENERATED = HERE / "_generated"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
DEFAULT_COLLECTION = "auditLogs/signIns"
# Never page forever, whatever the server sends.
MAX_PAGES = 100_000
# Retries of one Graph page after 429/503 (honouring Retry-After, capped) or of a broker call
# while it is unavailable.
MAX_RETRIES = 3
MAX_RETRY_AFTER_SECS = 30.0


class CollectorError(Exception):
    """A failure worth one line on stderr and exit status 1."""


# --- gRPC stubs ------------------------------------------------------------------------------


def load_stubs(proto_root: Path = DEFAULT_PROTO_ROOT, out_root: Path = GENERATED):
    """Generates (once per proto content and grpcio-tools version) and imports the stubs.

    Generation goes to a temporary directory renamed into place, so concurrent collectors never
    import a half-written module. Returns the (messages, services) modules.
    """
    from grpc_tools import protoc  # only needed to generate; imported lazily

    proto = proto_root / PROTO_FILE
    if not proto.is_file():
        raise CollectorError(f"proto file {proto} not found (use --proto-root)")
    digest = hashlib.sha256(proto.read_bytes())
    digest.update(grpc.__version__.encode())
    target = out_root / digest.hexdigest()[:16]
    if not (target / "tokenbroker" / "v1" / "broker_pb2_grpc.py").is_file():
        out_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=out_root))
        well_known = Path(protoc.__file__).resolve().parent / "_proto"
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(proto),
            ]
        )
        if status != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CollectorError(f"grpc_tools.protoc failed on {proto} (status {status})")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process generated the same stubs first: use theirs.
            shutil.rmtree(tmp, ignore_errors=True)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    pb2 = importlib.import_module("tokenbroker.v1.broker_pb2")
    pb2_grpc = importlib.import_module("tokenbroker.v1.broker_pb2_grpc")
    return pb2, pb2_grpc


# --- tokens from the broker ------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class BrokerAuth:
    """How the collector proves who it is to the broker (as `tokenbroker token` does).

    `tokenbroker dev` accepts callers without credentials on its plaintext loopback listener;
    a production broker wants mutual TLS (cert + key) or a bearer token (for example a
    Kubernetes projected service-account token, read again at every call so rotation works).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    bearer_file: str | None = None


class BrokerTokens:
    """Asks the broker for tokens. Holds nothing longer than the caller keeps the token it got."""

    def __init__(self, address: str, tenant: str, scope: str, auth: BrokerAuth, timeout: float):
        pb2, pb2_grpc = load_stubs()
        self._pb2 = pb2
        self.tenant = tenant
        self.scope = scope
        self.timeout = timeout
        self.auth = auth
        self.requests = 0
        scheme, _, rest = address.rpartition("://")
        target = rest.rstrip("/")
        host = target.rsplit(":", 1)[0] if ":" in target else target
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        if scheme == "https":
            creds = grpc.ssl_channel_credentials(
                root_certificates=read(auth.ca_file),
                private_key=read(auth.key_file),
                certificate_chain=read(auth.cert_file),
            )
            self._channel = grpc.secure_channel(target, creds)
        elif scheme in ("", "http"):
            if auth.ca_file or auth.cert_file or auth.key_file:
                raise CollectorError("--broker-ca, --broker-cert and --broker-key need an https:// broker address")
            if auth.bearer_file and not is_loopback(host):
                raise CollectorError(
                    "refusing to send a bearer token over plaintext to a non-loopback broker; use https://"
                )
            self._channel = grpc.insecure_channel(target)
        else:
            raise CollectorError(f"broker address {address!r}: use http://host:port or https://host:port")
        self._stub = pb2_grpc.TokenBrokerStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def get(self, force_refresh: bool = False) -> str:
        from google.protobuf.duration_pb2 import Duration

        request = self._pb2.GetTokenRequest(
            tenant=self.tenant,
            scopes=[self.scope],
            # Enough for a few pages; the broker refreshes ahead of expiry anyway.
            min_validity=Duration(seconds=120),
            force_refresh=force_refresh,
        )
        metadata = []
        if self.auth.bearer_file:
            bearer = Path(self.auth.bearer_file).read_text().strip()
            metadata.append(("authorization", f"Bearer {bearer}"))
        for attempt in range(MAX_RETRIES + 1):
            try:
                self.requests += 1
                response = self._stub.GetToken(request, timeout=self.timeout, metadata=metadata)
                return response.access_token
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < MAX_RETRIES:
                    time.sleep(2**attempt)
                    continue
                raise CollectorError(
                    f"broker refused the token request for tenant {self.tenant!r}: {code.name}: {e.details()}"
                ) from None
        raise AssertionError("unreachable")


# --- paging through Graph --------------------------------------------------------------------


@dataclass
class Stats:
    pages: int = 0
    records: int = 0
    unauthorized: int = 0
    throttled: int = 0
    token_requests: int = 0

    def as_json(self) -> str:
        return json.dumps(
            {
                "event": "collector_done",
                "pages": self.pages,
                "records": self.records,
                "unauthorized": self.unauthorized,
                "throttled": self.throttled,
                "token_requests": self.token_requests,
            },
            sort_keys=True,
        )


def same_origin(a: str, b: str) -> bool:
    """Whether two URLs have the same scheme, host and port (the token may only go there)."""
    x, y = urlsplit(a), urlsplit(b)
    return (x.scheme.lower(), x.hostname, x.port) == (y.scheme.lower(), y.hostname, y.port)


def retry_after(response: requests.Response, attempt: int) -> float:
    value = response.headers.get("Retry-After", "")
    try:
        secs = float(value)
    except ValueError:
        secs = float(2**attempt)
    return max(0.0, min(secs, MAX_RETRY_AFTER_SECS))


def collect(
    tokens: BrokerTokens,
    start_url: str,
    verify: str | bool,
    out: IO[str],
    timeout: float = 30.0,
    session: requests.Session | None = None,
) -> Stats:
    """Reads every page from `start_url`, writing each record as a JSON line to `out`."""
    if verify is False:  # never: the point is to trust the right CA, not to stop checking
        raise CollectorError("TLS verification cannot be disabled")
    if urlsplit(start_url).scheme != "https":
        raise CollectorError(f"Graph URL must be https://, got {start_url}")
    session = session or requests.Session()
    stats = Stats()
    token = tokens.get()
    url: str | None = start_url
    while url:
        if stats.pages >= MAX_PAGES:
            raise CollectorError(f"stopped after {MAX_PAGES} pages")
        if not same_origin(url, start_url):
            raise CollectorError(f"refusing to follow @odata.nextLink to another origin: {url}")
        reasked = False
        attempt = 0
        while True:
            try:
                # verify= per request: a session-level setting would lose to REQUESTS_CA_BUNDLE.
                response = session.get(
                    url,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Accept": "application/json",
                        "client-request-id": str(uuid.uuid4()),
                    },
                    verify=verify,
                    timeout=timeout,
                )
            except requests.exceptions.SSLError as e:
                raise CollectorError(f"TLS verification of {url} failed (is --ca-file right?): {e}") from None
            except requests.exceptions.RequestException as e:
                raise CollectorError(f"GET {url}: {e}") from None
            if response.status_code == 401 and not reasked:
                # Expired or revoked: ask the broker again (forcing a new exchange) and retry once.
                stats.unauthorized += 1
                reasked = True
                token = tokens.get(force_refresh=True)
                continue
            if response.status_code in (429, 503, 504) and attempt < MAX_RETRIES:
                stats.throttled += 1
                time.sleep(retry_after(response, attempt))
                attempt += 1
                continue
            break
        if response.status_code != 200:
            try:
                error = response.json().get("error", {})
                detail = f"{error.get('code')}: {error.get('message')}"
            except ValueError:
                detail = response.text[:200]
            raise CollectorError(f"GET {url}: HTTP {response.status_code} {detail}")
        body = response.json()
        for record in body.get("value", []):
            out.write(json.dumps(record, sort_keys=True) + "\n")
            stats.records += 1
        stats.pages += 1
        url = body.get("@odata.nextLink")
    out.flush()
    stats.token_requests = tokens.requests
    return stats


# --- command line ----------------------------------------------------------------------------


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Collect Graph-style sign-in logs for one tenant with a token from tokenbroker.",
    )
    p.add_argument("--broker", default=env("TOKENBROKER_ADDR", "http://127.0.0.1:50051"),
                   help="broker gRPC address, http:// (loopback dev) or https:// (env TOKENBROKER_ADDR)")
    p.add_argument("--tenant", default=env("COLLECTOR_TENANT"),
                   help="tenant name as configured in the broker (env COLLECTOR_TENANT)")
    p.add_argument("--graph-base", default=env("GRAPH_BASE_URL", "https://graph.microsoft.com/v1.0"),
                   help="Graph base URL (env GRAPH_BASE_URL); for tokenbroker dev: {authority_host}/graph/v1.0")
    p.add_argument("--collection", default=env("GRAPH_COLLECTION", DEFAULT_COLLECTION),
                   help=f"collection path under the base URL (default {DEFAULT_COLLECTION})")
    p.add_argument("--top", type=int, default=None, help="page size ($top); default: the server's")
    p.add_argument("--ca-file", default=env("GRAPH_CA_FILE"),
                   help="CA bundle that verifies Graph's TLS certificate (env GRAPH_CA_FILE); default: certifi's roots")
    p.add_argument("--scope", default=env("GRAPH_SCOPE", GRAPH_SCOPE))
    p.add_argument("--out", default="-", help="JSON-lines output file (default stdout)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--broker-ca", default=env("TOKENBROKER_CA_FILE"),
                   help="CA of the broker's TLS certificate (https:// broker)")
    p.add_argument("--broker-cert", default=env("TOKENBROKER_CLIENT_CERT"),
                   help="client certificate (PEM) for mutual TLS with the broker; goes with --broker-key")
    p.add_argument("--broker-key", default=env("TOKENBROKER_CLIENT_KEY"),
                   help="private key (PEM) of --broker-cert")
    p.add_argument("--broker-bearer-file", default=env("TOKENBROKER_BEARER_FILE"),
                   help="file holding a bearer JWT for the broker, read at every call (env TOKENBROKER_BEARER_FILE)")
    p.add_argument("--proto-root", default=str(DEFAULT_PROTO_ROOT), help=argparse.SUPPRESS)
    p.add_argument("--generate-stubs", action="store_true",
                   help="generate the gRPC stubs into examples/collector/_generated and exit")
    args = p.parse_args(argv)
    if not args.generate_stubs and not args.tenant:
        p.error("--tenant (or COLLECTOR_TENANT) is required")
    if bool(args.broker_cert) != bool(args.broker_key):
        p.error("--broker-cert and --broker-key go together")
    if args.top is not None and args.top < 1:
        p.error("--top must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.generate_stubs:
            load_stubs(Path(args.proto_root))
            print(f"stubs generated under {GENERATED}", file=sys.stderr)
            return 0
        load_stubs(Path(args.proto_root))
        url = f"{args.graph_base.rstrip('/')}/{args.collection.strip('/')}"
        if args.top is not None:
            url += f"?$top={args.top}"
        verify: str | bool = True
        if args.ca_file:
            if not Path(args.ca_file).is_file():
                raise CollectorError(f"--ca-file {args.ca_file} not found")
            verify = args.ca_file
        auth = BrokerAuth(args.broker_ca, args.broker_cert, args.broker_key, args.broker_bearer_file)
        tokens = BrokerTokens(args.broker, args.tenant, args.scope, auth, args.timeout)
        try:
            if args.out == "-":
                stats = collect(tokens, url, verify, sys.stdout, args.timeout)
            else:
                with open(args.out, "w", encoding="utf-8") as out:
                    stats = collect(tokens, url, verify, out, args.timeout)
        finally:
            tokens.close()
    except CollectorError as e:
        print(f"collector: {e}", file=sys.stderr)
        return 1
    print(stats.as_json(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
