"""Entra ID v1.0 token endpoint (/{tenant}/oauth2/token), the one the v1.0 discovery document
names: msal as an OpenID Connect client of that document (oidc_authority), naming the resource
as v1.0 does (resource=), with its own certificate assertion addressed to that endpoint."""

from __future__ import annotations

import msal

from conftest import GRAPH_RESOURCE, GRAPH_SCOPE, HTTP_TIMEOUT_S


def _v1_app(tc, emulator, ids, ca_bundle) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        ids.app["client_id"],
        client_credential={"private_key": tc.key_pem, "thumbprint": tc.sha1_hex},
        # msal reads {oidc_authority}/.well-known/openid-configuration: the v1.0 document,
        # whose token_endpoint is the v1.0 one (and the assertion's audience).
        oidc_authority=f"{emulator.authority_host}/{ids.tenant_id}",
        verify=ca_bundle,
        timeout=HTTP_TIMEOUT_S,
    )


def test_msal_against_the_v1_endpoint_reads_its_string_answer(
    config_app_cert, emulator, ids, ca_bundle, openid_config, verify_token, http
):
    v1 = http.get(f"{emulator.authority_host}/{ids.tenant_id}/.well-known/openid-configuration",
                  timeout=HTTP_TIMEOUT_S).json()
    assert v1["token_endpoint"] == f"{emulator.authority_host}/{ids.tenant_id}/oauth2/token"
    app = _v1_app(config_app_cert, emulator, ids, ca_bundle)

    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE], data={"resource": GRAPH_RESOURCE})

    assert "access_token" in result, result
    # The v1.0 endpoint answers strings; msal turns expires_in into a number itself.
    assert result["resource"] == GRAPH_RESOURCE
    assert isinstance(result["expires_on"], str) and int(result["expires_on"]) > 0
    claims = verify_token(result["access_token"], openid_config["jwks_uri"], audience=GRAPH_RESOURCE)
    assert claims["tid"] == ids.tenant_id
    assert claims["appid"] == ids.app["client_id"]
    assert claims["ver"] == "1.0"
    assert int(result["expires_on"]) == claims["exp"]


def test_msal_against_the_v1_endpoint_without_resource_is_aadsts900144(config_app_cert, emulator, ids, ca_bundle):
    app = _v1_app(config_app_cert, emulator, ids, ca_bundle)

    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])

    assert result.get("error") == "invalid_request", result
    assert result.get("error_codes") == [900144], result
    assert result["error_description"].startswith("AADSTS900144: "), result
    assert result.get("trace_id") and result.get("correlation_id"), result
