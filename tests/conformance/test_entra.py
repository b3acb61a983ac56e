"""Entra ID v2.0 token endpoint: msal's confidential client with certificates the suite made
itself, managed identity as a federated credential, and raw client-assertion posts for what
msal does not exercise (an assertion presented twice)."""

from __future__ import annotations

import hashlib

import msal
import pytest
from cryptography.hazmat.primitives import serialization

from conftest import GRAPH_RESOURCE, GRAPH_SCOPE, HTTP_TIMEOUT_S, JWT_BEARER, generate_cert, make_assertion

def _client_credential(variant: str, tc) -> dict:
    if variant == "sha1-thumbprint":
        # msal signs RS256 and sends x5t (SHA-1): the long-standing Entra form.
        return {"private_key": tc.key_pem, "thumbprint": tc.sha1_hex}
    # msal (>= 1.35) computes the SHA-256 thumbprint itself, signs PS256 and sends
    # x5t#S256 (plus x5c): the form Entra's current documentation describes.
    return {"private_key": tc.key_pem, "public_certificate": tc.cert_pem}


def _app(client_id: str, credential: dict, emulator, tenant_id: str, ca_bundle: str,
         instance_discovery=False) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=f"{emulator.authority_host}/{tenant_id}",
        # instance_discovery=False: by default msal first asks
        # https://login.microsoftonline.com/common/discovery/instance whether the authority's
        # host is a known Entra cloud (authority validation). 127.0.0.1:PORT is not one, and
        # login.microsoftonline.com is not reachable from the test machine anyway. Tenant
        # discovery (GET {authority}/v2.0/.well-known/openid-configuration) still runs, against
        # the emulator. test_msal_instance_discovery_against_the_emulator points msal's
        # instance discovery at the emulator instead, to cover that endpoint too.
        instance_discovery=instance_discovery,
        verify=ca_bundle,  # the emulator CA on top of certifi's roots; never verify=False
        timeout=HTTP_TIMEOUT_S,
    )


@pytest.fixture(params=["config", "imported"])
def app_cert(request):
    """The certificate the msal app authenticates with (both made by the suite)."""
    return request.getfixturevalue("config_app_cert" if request.param == "config" else "imported_app_cert")


@pytest.mark.parametrize("variant", ["sha1-thumbprint", "public-certificate"])
def test_msal_client_credentials_with_suite_certificate(
    variant, app_cert, emulator, ids, ca_bundle, openid_config, verify_token, http
):
    app = _app(ids.app["client_id"], _client_credential(variant, app_cert), emulator, ids.tenant_id, ca_bundle)

    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])

    assert "access_token" in result, result
    assert result["token_type"] == "Bearer"
    assert isinstance(result["expires_in"], int) and result["expires_in"] > 300
    claims = verify_token(result["access_token"], openid_config["jwks_uri"], audience=GRAPH_RESOURCE)
    assert claims["tid"] == ids.tenant_id
    # Graph takes v1.0 tokens: the v1.0 issuer (the v1.0 OpenID configuration's), appid.
    assert claims["appid"] == ids.app["client_id"]
    assert claims["ver"] == "1.0"
    v1_url = f"{emulator.authority_host}/{ids.tenant_id}/.well-known/openid-configuration"
    v1 = http.get(v1_url, timeout=HTTP_TIMEOUT_S).json()
    assert claims["iss"] == v1["issuer"] == f"https://sts.windows.net/{ids.tenant_id}/"
    assert set(ids.app["roles"]) <= set(claims.get("roles", []))


def test_msal_reuses_its_assertion_for_a_second_scope(config_app_cert, emulator, ids, ca_bundle):
    # msal signs one assertion and presents it again within 9 minutes: accepted, as by Entra.
    app = _app(ids.app["client_id"], _client_credential("sha1-thumbprint", config_app_cert), emulator,
               ids.tenant_id, ca_bundle)
    for scope in (GRAPH_SCOPE, "https://management.azure.com/.default"):
        result = app.acquire_token_for_client(scopes=[scope])
        assert "access_token" in result, (scope, result)


def test_msal_instance_discovery_against_the_emulator(config_app_cert, emulator, ids, ca_bundle):
    discovery = f"{emulator.authority_host}/common/discovery/instance"
    app = _app(ids.app["client_id"], _client_credential("sha1-thumbprint", config_app_cert), emulator,
               ids.tenant_id, ca_bundle, instance_discovery=discovery)

    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])

    assert "access_token" in result, result


def test_key_vault_holds_the_config_certificate(mi_credential, emulator, ids, ca_bundle, config_app_cert):
    from azure.keyvault.certificates import CertificateClient

    cred = mi_credential(ids.user_mi["client_id"])
    # verify_challenge_resource=False: see KV_CLIENT_OPTS in test_keyvault.py (loopback host
    # is not a subdomain of the challenge's https://vault.azure.net).
    with CertificateClient(emulator.key_vault_url, cred, verify_challenge_resource=False,
                           connection_verify=ca_bundle) as client:
        cert = client.get_certificate(ids.config_cert)
    assert cert.cer == config_app_cert.cert.public_bytes(serialization.Encoding.DER)
    assert cert.properties.x509_thumbprint.hex() == config_app_cert.sha1_hex


def test_imported_certificate_is_the_current_version(mi_credential, emulator, ids, ca_bundle, imported_app_cert):
    from azure.keyvault.certificates import CertificateClient

    cred = mi_credential(ids.user_mi["client_id"])
    with CertificateClient(emulator.key_vault_url, cred, verify_challenge_resource=False,
                           connection_verify=ca_bundle) as client:
        cert = client.get_certificate(ids.app_cert)
    assert cert.properties.version == imported_app_cert.version
    assert cert.properties.x509_thumbprint.hex() == imported_app_cert.sha1_hex


def test_msal_scope_without_default_suffix_is_aadsts1002012(config_app_cert, emulator, ids, ca_bundle):
    app = _app(ids.app["client_id"], _client_credential("sha1-thumbprint", config_app_cert), emulator,
               ids.tenant_id, ca_bundle)

    result = app.acquire_token_for_client(scopes=[GRAPH_RESOURCE])  # no "/.default"

    assert "access_token" not in result, result
    assert result["error"] == "invalid_scope"
    assert "AADSTS1002012" in result["error_description"]
    assert 1002012 in result["error_codes"]


def test_msal_unregistered_certificate_is_aadsts700027(emulator, ids, ca_bundle):
    key, cert = generate_cert("never registered on the app")
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
    assert "AADSTS700027" in result["error_description"]


def test_an_assertion_presented_again_is_accepted_as_entra_does(config_app_cert, openid_config, http, ids):
    # Entra ID does not keep an assertion to one use: msal reuses one for up to 9 minutes
    # (msal.oauth2cli.assertion.AutoRefresher), across scopes and token expiries.
    token_url = openid_config["token_endpoint"]
    form = {
        "client_id": ids.app["client_id"],
        "scope": GRAPH_SCOPE,
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": make_assertion(ids.app["client_id"], token_url, config_app_cert),
    }
    for _ in range(2):
        answer = http.post(token_url, data=form, timeout=HTTP_TIMEOUT_S)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["token_type"] == "Bearer"
        assert isinstance(body["expires_in"], int)
        assert isinstance(body.get("ext_expires_in", 0), int)
        assert body["access_token"]


# --------------------------------------------------------------------------- managed identity as FIC

FIC_SCOPE = "api://AzureADTokenExchange/.default"


def _fic_app(mi_credential, emulator, ids, ca_bundle) -> msal.ConfidentialClientApplication:
    """msal app whose assertion is a managed-identity token (MI as federated credential)."""
    cred = mi_credential(ids.user_mi["client_id"])

    def assertion() -> str:
        return cred.get_token(FIC_SCOPE).token

    return _app(ids.fic_app["client_id"], {"client_assertion": assertion}, emulator, ids.tenant_id, ca_bundle)


def test_managed_identity_as_federated_credential(mi_credential, emulator, ids, ca_bundle, openid_config,
                                                  verify_token):
    app = _fic_app(mi_credential, emulator, ids, ca_bundle)

    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])

    assert "access_token" in result, result
    claims = verify_token(result["access_token"], openid_config["jwks_uri"], audience=GRAPH_RESOURCE)
    assert claims["tid"] == ids.tenant_id
    assert claims["appid"] == ids.fic_app["client_id"]


def test_disabled_app_is_aadsts7000112_and_enable_restores_it(mi_credential, emulator, ids, ca_bundle, admin):
    admin.set_app_enabled(ids.tenant_id, ids.fic_app["client_id"], False)
    try:
        result = _fic_app(mi_credential, emulator, ids, ca_bundle).acquire_token_for_client(scopes=[GRAPH_SCOPE])
        assert "access_token" not in result, result
        assert 7000112 in result["error_codes"], result
        assert "AADSTS7000112" in result["error_description"]
    finally:
        admin.set_app_enabled(ids.tenant_id, ids.fic_app["client_id"], True)

    result = _fic_app(mi_credential, emulator, ids, ca_bundle).acquire_token_for_client(scopes=[GRAPH_SCOPE])
    assert "access_token" in result, result
