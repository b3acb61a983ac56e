"""Managed identity: azure-identity in App Service and IMDS modes, and the raw IMDS shape."""

from __future__ import annotations

import time

import pytest
import requests

from conftest import ARM_RESOURCE, HTTP_TIMEOUT_S, VAULT_RESOURCE, VAULT_SCOPE


def jwks_uri(emulator, tenant_id: str) -> str:
    return f"{emulator.authority_host}/{tenant_id}/discovery/v2.0/keys"


def test_openid_configuration_points_at_the_emulator_jwks(emulator, ids, openid_config):
    assert openid_config["jwks_uri"] == jwks_uri(emulator, ids.tenant_id)
    assert openid_config["token_endpoint"] == f"{emulator.authority_host}/{ids.tenant_id}/oauth2/v2.0/token"
    assert ids.tenant_id in openid_config["issuer"]


@pytest.mark.parametrize("which", ["system", "user"])
def test_app_service_managed_identity_vault_token(which, mi_credential, emulator, ids, verify_token):
    """ManagedIdentityCredential through IDENTITY_ENDPOINT/IDENTITY_HEADER (App Service mode)."""
    identity = ids.system_mi if which == "system" else ids.user_mi
    cred = mi_credential(None if which == "system" else identity["client_id"])

    token = cred.get_token(VAULT_SCOPE)

    assert token.expires_on > time.time() + 300
    claims = verify_token(token.token, jwks_uri(emulator, identity["tenant_id"]), audience=VAULT_RESOURCE)
    assert claims["oid"] == identity["object_id"]
    assert claims["tid"] == identity["tenant_id"]
    assert claims["appid"] == identity["client_id"]
    # Managed-identity tokens for Key Vault are v1 tokens, issued by sts.windows.net.
    assert claims["iss"] == f"https://sts.windows.net/{identity['tenant_id']}/"
    # azure-identity derives expires_on from the response; it must describe the same token.
    assert claims["exp"] == pytest.approx(token.expires_on, abs=120)


def test_app_service_unknown_user_assigned_client_id_is_refused(mi_credential):
    from azure.core.exceptions import ClientAuthenticationError

    cred = mi_credential("99999999-9999-4999-8999-999999999999")
    with pytest.raises(ClientAuthenticationError):
        cred.get_token(VAULT_SCOPE)


def test_imds_mode_through_pod_identity_host(monkeypatch, emulator, ids, ca_bundle, verify_token):
    """azure-identity's IMDS path (no IDENTITY_ENDPOINT); AZURE_POD_IDENTITY_AUTHORITY_HOST
    is the documented override of the 169.254.169.254 address, honoured by azure-identity and msal."""
    from azure.identity import ManagedIdentityCredential

    for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT",
                 "MSI_ENDPOINT", "MSI_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", emulator.imds_endpoint)
    identity = ids.user_mi
    with ManagedIdentityCredential(client_id=identity["client_id"]) as cred:
        token = cred.get_token(VAULT_SCOPE)
    claims = verify_token(token.token, jwks_uri(emulator, identity["tenant_id"]), audience=VAULT_RESOURCE)
    assert claims["oid"] == identity["object_id"]
    assert claims["appid"] == identity["client_id"]


def _imds_url(emulator) -> str:
    return f"{emulator.imds_endpoint}/metadata/identity/oauth2/token"


def test_imds_shape_all_values_are_strings(emulator, ids):
    r = requests.get(
        _imds_url(emulator),
        params={"api-version": "2018-02-01", "resource": ARM_RESOURCE},
        headers={"Metadata": "true"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    for field in ("access_token", "expires_in", "expires_on", "not_before", "resource", "token_type"):
        assert field in body, f"IMDS response lacks {field}: {body}"
    for field, value in body.items():
        assert isinstance(value, str), f"IMDS field {field} is {type(value).__name__}, must be a string"
    assert body["token_type"] == "Bearer"
    assert body["resource"].rstrip("/") == ARM_RESOURCE
    now = time.time()
    assert body["expires_on"].isdigit() and int(body["expires_on"]) > now
    assert body["expires_in"].isdigit() and int(body["expires_in"]) > 300
    assert body["not_before"].isdigit() and int(body["not_before"]) <= now + 60


def test_imds_user_assigned_by_client_id(emulator, ids, verify_token):
    identity = ids.user_mi
    r = requests.get(
        _imds_url(emulator),
        params={"api-version": "2018-02-01", "resource": VAULT_RESOURCE, "client_id": identity["client_id"]},
        headers={"Metadata": "true"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    claims = verify_token(body["access_token"], jwks_uri(emulator, identity["tenant_id"]), audience=VAULT_RESOURCE)
    assert claims["appid"] == identity["client_id"]
    assert claims["oid"] == identity["object_id"]


def test_imds_without_metadata_header_is_400(emulator):
    r = requests.get(
        _imds_url(emulator),
        params={"api-version": "2018-02-01", "resource": ARM_RESOURCE},
        timeout=HTTP_TIMEOUT_S,
    )
    assert r.status_code == 400, r.text
    assert "error" in r.json()
