"""Key Vault: azure-keyvault-certificates and azure-keyvault-keys against the emulated vault."""

from __future__ import annotations

import hashlib

import pytest
import requests
from azure.core.exceptions import HttpResponseError
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from conftest import ARM_RESOURCE, HTTP_TIMEOUT_S, VAULT_RESOURCE, generate_cert

# Why verify_challenge_resource=False (and only that; TLS verification stays on):
# the Key Vault SDK answers the service's 401 bearer challenge only if the vault's host
# is a subdomain of the resource the challenge names. The challenge names
# resource="https://vault.azure.net" (as the real service does) and the real service's
# hosts are *.vault.azure.net, so that check passes in Azure. Here the vault is reached as
# https://127.0.0.1:PORT (Python's HTTP stack cannot easily pin a *.vault.azure.net name
# to loopback), so domain verification would refuse the challenge.
KV_CLIENT_OPTS = {"verify_challenge_resource": False}


@pytest.fixture()
def signer_credential(mi_credential, ids):
    """The user-assigned identity: Key Vault Crypto User + Certificate User."""
    return mi_credential(ids.user_mi["client_id"])


@pytest.fixture()
def cert_client(signer_credential, emulator, ca_bundle):
    from azure.keyvault.certificates import CertificateClient

    with CertificateClient(emulator.key_vault_url, signer_credential, connection_verify=ca_bundle,
                           **KV_CLIENT_OPTS) as client:
        yield client


@pytest.fixture()
def signing_cert(cert_client, ids):
    return cert_client.get_certificate(ids.signing_cert)


@pytest.fixture()
def crypto_client(signing_cert, signer_credential, ca_bundle):
    from azure.keyvault.keys.crypto import CryptographyClient

    with CryptographyClient(signing_cert.key_id, signer_credential, connection_verify=ca_bundle,
                            **KV_CLIENT_OPTS) as client:
        yield client


def test_challenge_resource_verification_refuses_the_loopback_host(signer_credential, emulator, ca_bundle, ids):
    """Why the suite passes verify_challenge_resource=False: left on (the SDK default), the SDK
    refuses the challenge for https://vault.azure.net on a 127.0.0.1 host, before sending a token."""
    from azure.keyvault.certificates import CertificateClient

    with CertificateClient(emulator.key_vault_url, signer_credential, connection_verify=ca_bundle) as client:
        with pytest.raises(ValueError, match="does not match the requested domain"):
            client.get_certificate(ids.signing_cert)


def test_get_certificate(signing_cert, emulator, ids):
    cert = signing_cert
    vault = emulator.key_vault_url.rstrip("/")
    assert cert.name == ids.signing_cert
    version = cert.properties.version
    assert version
    assert cert.id == f"{vault}/certificates/{ids.signing_cert}/{version}"
    assert cert.key_id == f"{vault}/keys/{ids.signing_cert}/{version}"
    assert cert.secret_id == f"{vault}/secrets/{ids.signing_cert}/{version}"
    assert cert.properties.vault_url.rstrip("/") == vault
    assert cert.properties.enabled is True
    # x5t is the SHA-1 of the DER certificate (the SDK decodes the base64url for us).
    assert cert.properties.x509_thumbprint == hashlib.sha1(cert.cer).digest()
    parsed = x509.load_der_x509_certificate(cert.cer)
    public_key = parsed.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    assert public_key.key_size == 2048


def test_get_certificate_version(cert_client, signing_cert, ids):
    again = cert_client.get_certificate_version(ids.signing_cert, signing_cert.properties.version)
    assert again.cer == signing_cert.cer
    assert again.key_id == signing_cert.key_id


def test_missing_certificate_is_404(cert_client):
    from azure.core.exceptions import ResourceNotFoundError

    with pytest.raises(ResourceNotFoundError) as info:
        cert_client.get_certificate("no-such-certificate")
    assert info.value.status_code == 404


def _verify(public_key: rsa.RSAPublicKey, alg: str, signature: bytes, digest: bytes) -> None:
    if alg == "RS256":
        pad = padding.PKCS1v15()
    else:  # PS256: MGF1-SHA256, salt length = hash length (RFC 7518 3.5)
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    public_key.verify(signature, digest, pad, utils.Prehashed(hashes.SHA256()))


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_sign_and_verify_with_certificate_key(alg, crypto_client, signing_cert):
    from azure.keyvault.keys.crypto import SignatureAlgorithm

    algorithm = SignatureAlgorithm(alg)
    digest = hashlib.sha256(b"header.claims of a client assertion").digest()

    result = crypto_client.sign(algorithm, digest)

    assert result.key_id == signing_cert.key_id
    assert result.algorithm == algorithm
    assert len(result.signature) == 256
    public_key = x509.load_der_x509_certificate(signing_cert.cer).public_key()
    _verify(public_key, alg, result.signature, digest)
    with pytest.raises(InvalidSignature):
        _verify(public_key, alg, result.signature, hashlib.sha256(b"something else").digest())


def test_sign_wrong_digest_length_is_400(crypto_client):
    from azure.keyvault.keys.crypto import SignatureAlgorithm

    with pytest.raises(HttpResponseError) as info:
        crypto_client.sign(SignatureAlgorithm.rs256, b"\x01" * 20)  # a SHA-1 sized digest for RS256
    assert info.value.status_code == 400
    assert info.value.response.json()["error"]["code"]


def test_role_without_import_permission_is_403(cert_client, ids):
    from azure.keyvault.certificates import CertificateContentType, CertificatePolicy

    key, cert = generate_cert("not allowed")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(HttpResponseError) as info:
        cert_client.import_certificate("forbidden-import", pem,
                                       policy=CertificatePolicy(content_type=CertificateContentType.pem))
    assert info.value.status_code == 403
    assert info.value.response.json()["error"]["code"] == "Forbidden"


# --------------------------------------------------------------------------- raw HTTP negatives


def _kv_get(http: requests.Session, emulator, path: str, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http.get(f"{emulator.key_vault_url.rstrip('/')}{path}", params={"api-version": "7.5"},
                    headers=headers, timeout=HTTP_TIMEOUT_S)


def test_unauthenticated_request_gets_bearer_challenge(http, emulator, ids):
    r = _kv_get(http, emulator, f"/certificates/{ids.signing_cert}", None)
    assert r.status_code == 401
    challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource="{VAULT_RESOURCE}"' in challenge
    assert f'authorization="https://login.windows.net/{ids.tenant_id}"' in challenge
    assert r.json()["error"]["code"] == "Unauthorized"


def test_token_for_another_audience_is_401(mi_credential, http, emulator, ids):
    cred = mi_credential(ids.user_mi["client_id"])
    arm_token = cred.get_token(f"{ARM_RESOURCE}/.default").token
    r = _kv_get(http, emulator, f"/certificates/{ids.signing_cert}", arm_token)
    assert r.status_code == 401, r.text
    error = r.json()["error"]
    assert error["code"] == "Unauthorized"
    assert error["message"].startswith("AKV10022"), error  # Key Vault's "Invalid audience"
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer ")


# --------------------------------------------------------------------------- admin: rotation, faults, counters


def test_admin_rotate_makes_a_new_current_version(admin, cert_client, signer_credential, ca_bundle, emulator, ids):
    from azure.keyvault.keys.crypto import CryptographyClient, SignatureAlgorithm

    before = cert_client.get_certificate(ids.signing_cert)
    rotated = admin.rotate(ids.vault_name, ids.signing_cert)
    after = cert_client.get_certificate(ids.signing_cert)

    assert after.properties.version == rotated["version"] != before.properties.version
    assert after.properties.x509_thumbprint == hashlib.sha1(after.cer).digest() != before.properties.x509_thumbprint
    # The old version stays readable, and the new key signs.
    old = cert_client.get_certificate_version(ids.signing_cert, before.properties.version)
    assert old.cer == before.cer
    digest = hashlib.sha256(b"after rotation").digest()
    with CryptographyClient(after.key_id, signer_credential, connection_verify=ca_bundle, **KV_CLIENT_OPTS) as crypto:
        result = crypto.sign(SignatureAlgorithm.ps256, digest)
    _verify(x509.load_der_x509_certificate(after.cer).public_key(), "PS256", result.signature, digest)
    with pytest.raises(InvalidSignature):
        _verify(x509.load_der_x509_certificate(before.cer).public_key(), "PS256", result.signature, digest)



def test_throttled_sign_is_retried_by_the_sdk(clean_faults, crypto_client, signing_cert):
    from azure.keyvault.keys.crypto import SignatureAlgorithm

    admin = clean_faults
    digest = hashlib.sha256(b"retry me").digest()
    crypto_client.sign(SignatureAlgorithm.rs256, digest)  # warm up: challenge and token are cached now
    admin.reset_counters()
    admin.add_fault({"route": "keyvault.sign", "fail": {"status": 429, "retry_after": 1}, "count": 1})

    result = crypto_client.sign(SignatureAlgorithm.rs256, digest)  # 429, Retry-After: 1, then 200

    public_key = x509.load_der_x509_certificate(signing_cert.cer).public_key()
    _verify(public_key, "RS256", result.signature, digest)
    counters = admin.counters()
    assert counters["routes"]["keyvault.sign"] == {"total": 2, "success": 1, "failure": 1}, counters
    # Exactly one signature was actually made, with the certificate's current key version.
    key_version = signing_cert.key_id.rsplit("/", 2)
    assert sum(counters["sign"].values()) == 1, counters
    assert [k for k in counters["sign"] if k.endswith(f"{key_version[-2]}/{key_version[-1]}")], counters


def test_sdk_import_certificate_pem(mi_credential, emulator, ca_bundle):
    """azure-keyvault-certificates sends PEM base64-encoded (as .NET does; the service accepts it)."""
    from azure.keyvault.certificates import CertificateClient, CertificateContentType, CertificatePolicy

    key, cert = generate_cert("imported with the SDK")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM)
    admin_cred = mi_credential()  # system-assigned: Key Vault Administrator
    with CertificateClient(emulator.key_vault_url, admin_cred, connection_verify=ca_bundle,
                           **KV_CLIENT_OPTS) as client:
        imported = client.import_certificate("sdk-imported", pem,
                                             policy=CertificatePolicy(content_type=CertificateContentType.pem))
    der = cert.public_bytes(serialization.Encoding.DER)
    assert imported.cer == der
    assert imported.properties.x509_thumbprint == hashlib.sha1(der).digest()


# --------------------------------------------------------------------------- TLS


def test_tls_is_verified_and_the_certificate_names_loopback(emulator, ca_bundle):
    """The suite trusts the emulator only through its CA: certifi's roots alone refuse it,
    and the server certificate is valid for 127.0.0.1 and localhost."""
    import certifi

    url = emulator.key_vault_url.rstrip("/") + "/certificates"
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, params={"api-version": "7.5"}, verify=certifi.where(), timeout=HTTP_TIMEOUT_S)
    for base in (emulator.key_vault_url, emulator.key_vault_url.replace("127.0.0.1", "localhost")):
        r = requests.get(base.rstrip("/") + "/certificates", params={"api-version": "7.5"}, verify=ca_bundle,
                         timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 401  # reached the vault (no token): TLS and host name verified
