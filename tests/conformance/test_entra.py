"""Entra ID v2.0 token endpoint: msal's confidential client with a certificate, and raw
client-assertion posts for what msal does not exercise (replay)."""

from __future__ import annotations

import msal
import pytest

from conftest import GRAPH_RESOURCE, GRAPH_SCOPE, HTTP_TIMEOUT_S, JWT_BEARER, generate_cert, make_assertion


def _client_credential(variant: str, tc) -> dict:
    if variant == "sha1-thumbprint":
        # msal signs RS256 and sends x5t (SHA-1): the long-standing Entra form.
        return {"private_key": tc.key_pem, "thumbprint": tc.sha1_hex}
    # msal (>= 1.35) computes the SHA-256 thumbprint itself, signs PS256 and sends
    # x5t#S256 (plus x5c): the form Entra's current documentation describes.
    return {"private_key": tc.key_pem, "public_certificate": tc.cert_pem}


def _app(client_id: str, credential: dict, emulator, tenant_id: str, ca_bundle: str) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=f"{emulator.authority_host}/{tenant_id}",
        # instance_discovery=False: by default msal first asks
        # https://login.microsoftonline.com/common/discovery/instance whether the authority's
        # host is a known Entra cloud. 127.0.0.1:PORT is not, and that host is not reachable
        # from the test machine anyway. Tenant discovery (GET {authority}/v2.0/.well-known/
        # openid-configuration) still happens, against the emulator.
        instance_discovery=False,
        verify=ca_bundle,  # the emulator CA on top of certifi's roots; never verify=False
        timeout=HTTP_TIMEOUT_S,
    )


@pytest.mark.parametrize("variant", ["sha1-thumbprint", "public-certificate"])
def test_msal_client_credentials_with_imported_certificate(
    variant, imported_app_cert, emulator, ids, ca_bundle, openid_config, verify_token
):
    app = _app(ids.app["client_id"], _client_credential(variant, imported_app_cert), emulator, ids.tenant_id, ca_bundle)

    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])

    assert "access_token" in result, result
    assert result["token_type"] == "Bearer"
    assert isinstance(result["expires_in"], int) and result["expires_in"] > 300
    claims = verify_token(result["access_token"], openid_config["jwks_uri"], audience=GRAPH_RESOURCE)
    assert claims["tid"] == ids.tenant_id
    assert claims["appid"] == ids.app["client_id"]
    assert set(ids.app["roles"]) <= set(claims.get("roles", []))


def test_msal_scope_without_default_suffix_is_aadsts1002012(imported_app_cert, emulator, ids, ca_bundle):
    app = _app(ids.app["client_id"], _client_credential("sha1-thumbprint", imported_app_cert), emulator,
               ids.tenant_id, ca_bundle)

    result = app.acquire_token_for_client(scopes=[GRAPH_RESOURCE])  # no "/.default"

    assert "access_token" not in result, result
    assert result["error"] == "invalid_scope"
    assert "AADSTS1002012" in result["error_description"]
    assert 1002012 in result["error_codes"]


def test_msal_unregistered_certificate_is_aadsts700027(imported_app_cert, emulator, ids, ca_bundle, tmp_path):
    from cryptography.hazmat.primitives import serialization
    import hashlib

    key, cert = generate_cert("never imported into the vault")
    credential = {
        "private_key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode(),
        "thumbprint": hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    }
    app = _app(ids.app["client_id"], credential, emulator, ids.tenant_id, ca_bundle)

    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])

    assert "access_token" not in result, result
    assert result["error"] == "invalid_client"
    assert 700027 in result["error_codes"]


def test_replayed_assertion_is_rejected(imported_app_cert, openid_config, http, ids):
    token_url = openid_config["token_endpoint"]
    form = {
        "client_id": ids.app["client_id"],
        "scope": GRAPH_SCOPE,
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": make_assertion(ids.app["client_id"], token_url, imported_app_cert),
    }

    first = http.post(token_url, data=form, timeout=HTTP_TIMEOUT_S)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], int)
    assert isinstance(body.get("ext_expires_in", 0), int)
    assert body["access_token"]

    replay = http.post(token_url, data=form, timeout=HTTP_TIMEOUT_S)
    assert replay.status_code in (400, 401), replay.text
    error = replay.json()
    assert error["error"] in ("invalid_client", "invalid_grant", "invalid_request"), error
    assert error["error_description"].startswith("AADSTS"), error
    assert isinstance(error["error_codes"], list) and all(isinstance(c, int) for c in error["error_codes"])
    for field in ("timestamp", "trace_id", "correlation_id"):
        assert field in error, error
