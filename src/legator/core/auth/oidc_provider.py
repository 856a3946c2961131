"""The OpenID Connect provider, as a relying party sees it: its discovery document and keys
(both cached), the authorization URL, the code exchange and the ID token's validation.

Authlib does the protocol: ``AsyncOAuth2Client`` builds the authorization URL (with the PKCE
challenge) and exchanges the code; ``CodeIDToken`` checks the ID token's claims. The token's
signature is checked by joserfc, the JOSE library Authlib itself now runs on (its own
``authlib.jose`` is deprecated in its favour). No token, code or secret is ever logged.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import JWKRegistry, Key, KeySet

from legator.core.config import Settings

DISCOVERY_PATH = "/.well-known/openid-configuration"
CACHE_TTL_S = 3600.0
JWKS_MIN_REFRESH_S = 30.0  # an unknown key id refetches the keys at most this often
HTTP_TIMEOUT_S = 10.0
ID_TOKEN_LEEWAY_S = 60  # clock skew allowed on exp, nbf and iat
MAX_DOCUMENT_BYTES = 512 * 1024
# Signature algorithms accepted on ID tokens: asymmetric ones only, so never "none", and never
# an HMAC whose key would be the client secret.
ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


def _transport_errors() -> tuple[type[Exception], ...]:
    # Authlib's httpx client runs on httpx2 when that is installed, else on httpx.
    errors: tuple[type[Exception], ...] = (httpx.HTTPError,)
    try:
        import httpx2
    except ImportError:  # pragma: no cover - depends on what else is installed
        return errors
    return (*errors, httpx2.HTTPError)


TRANSPORT_ERRORS = _transport_errors()


class OidcError(Exception):
    """A sign-in step failed. ``reason`` is a short code (audit, login page); ``str()`` says
    what went wrong for the log and audit, and never holds a token, code or secret."""

    status_code = 401

    def __init__(self, reason: str, message: str, *, username: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.username = username  # when the refusal is about a known user


class ProviderUnavailable(OidcError):
    """The provider could not be reached or answered nonsense."""

    status_code = 502

    def __init__(self, message: str) -> None:
        super().__init__("provider_unavailable", message)


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    token_auth_methods: tuple[str, ...]
    algorithms: tuple[str, ...]


@dataclass(frozen=True)
class IdentityClaims:
    """The validated ID token's claims that sign-in uses."""

    issuer: str
    subject: str
    claims: dict[str, Any]


def _same_scheme_rule(issuer: str, url: str) -> bool:
    """An https issuer's endpoints must be https too (a loopback http issuer, allowed by the
    settings for development, may use http)."""
    scheme = urlsplit(url).scheme
    return scheme == "https" or (scheme == "http" and issuer.startswith("http://"))


def parse_metadata(configured_issuer: str, document: Any) -> ProviderMetadata:
    if not isinstance(document, dict):
        raise ProviderUnavailable("the discovery document is not a JSON object")
    issuer = document.get("issuer")
    # The document must name the issuer we asked (OIDC Discovery §4.3); a trailing slash is
    # the one difference allowed, since the setting is stored without it.
    if not isinstance(issuer, str) or issuer.rstrip("/") != configured_issuer.rstrip("/"):
        raise ProviderUnavailable(
            f"the discovery document names issuer {str(issuer)[:200]!r}, "
            f"not {configured_issuer!r} (LEGATOR_OIDC_ISSUER)"
        )
    urls: dict[str, str] = {}
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = document.get(name)
        if not isinstance(value, str) or not _same_scheme_rule(issuer, value):
            raise ProviderUnavailable(f"the discovery document has no usable {name}")
        urls[name] = value
    methods = document.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    advertised = document.get("id_token_signing_alg_values_supported") or ["RS256"]
    algorithms = tuple(alg for alg in ASYMMETRIC_ALGORITHMS if alg in advertised)
    if not algorithms:
        raise ProviderUnavailable(
            "the provider signs ID tokens with none of " + ", ".join(ASYMMETRIC_ALGORITHMS)
        )
    return ProviderMetadata(
        issuer=issuer,
        token_auth_methods=tuple(str(m) for m in methods),
        algorithms=algorithms,
        **urls,
    )


class OidcProvider:
    """One configured provider. Safe to share between concurrent sign-ins."""

    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_enabled, "OidcProvider needs the OIDC settings"
        self.issuer: str = settings.oidc_issuer or ""
        self.client_id: str = settings.oidc_client_id or ""
        self.redirect_url: str = settings.oidc_redirect_url or ""
        self.scopes = settings.oidc_scopes
        self._secret = settings.oidc_client_secret
        self._http = httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, follow_redirects=False)
        self._lock = asyncio.Lock()
        self._metadata: tuple[float, ProviderMetadata] | None = None
        self._keys: tuple[float, KeySet] | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _get_json(self, url: str, what: str) -> Any:
        try:
            response = await self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"{what} at {url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise ProviderUnavailable(f"{what} at {url} answered HTTP {response.status_code}")
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise ProviderUnavailable(f"{what} at {url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return response.json()
        except ValueError:
            raise ProviderUnavailable(f"{what} at {url} is not JSON") from None

    async def metadata(self) -> ProviderMetadata:
        """The discovery document, fetched once an hour (and again after a failure)."""
        cached = self._metadata
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        async with self._lock:
            cached = self._metadata
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            document = await self._get_json(self.issuer + DISCOVERY_PATH, "discovery document")
            metadata = parse_metadata(self.issuer, document)
            self._metadata = (time.monotonic() + CACHE_TTL_S, metadata)
            return metadata

    async def _key_set(self, *, refresh: bool = False) -> KeySet:
        """The provider's signing keys, fetched once an hour, or sooner on ``refresh`` (an
        unknown key id) but at most every JWKS_MIN_REFRESH_S."""
        if self._keys is not None:
            age = time.monotonic() - self._keys[0]
            if age < CACHE_TTL_S and not (refresh and age >= JWKS_MIN_REFRESH_S):
                return self._keys[1]
        metadata = await self.metadata()
        document = await self._get_json(metadata.jwks_uri, "key set")
        raw = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(raw, list):
            raise ProviderUnavailable("the provider's key set has no 'keys' list")
        keys: list[Key] = []
        for entry in raw:
            # Encryption keys, secret (oct) keys and unknown key types are skipped.
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") == "oct":
                continue
            try:
                keys.append(JWKRegistry.import_key(entry))
            except (JoseError, ValueError, TypeError):
                continue
        if not keys:
            raise ProviderUnavailable("the provider's key set has no usable signing key")
        key_set = KeySet(keys)
        self._keys = (time.monotonic(), key_set)
        return key_set

    def _client(self, metadata: ProviderMetadata) -> AsyncOAuth2Client:
        secret = self._secret.get_secret_value() if self._secret is not None else None
        if secret is None:
            method = "none"  # a public client: PKCE is its only proof
        elif "client_secret_basic" in metadata.token_auth_methods:
            method = "client_secret_basic"
        else:
            method = "client_secret_post"
        return AsyncOAuth2Client(
            client_id=self.client_id,
            client_secret=secret,
            token_endpoint_auth_method=method,
            scope=self.scopes,
            redirect_uri=self.redirect_url,
            code_challenge_method="S256",
            timeout=HTTP_TIMEOUT_S,
        )

    async def authorization_url(self, *, state: str, nonce: str, code_verifier: str) -> str:
        metadata = await self.metadata()
        async with self._client(metadata) as client:
            url, _state = client.create_authorization_url(
                metadata.authorization_endpoint,
                state=state,
                code_verifier=code_verifier,
                nonce=nonce,
            )
        return str(url)

    async def exchange_code(self, code: str, code_verifier: str) -> dict[str, Any]:
        """The token endpoint's answer for an authorization code (with the PKCE verifier)."""
        metadata = await self.metadata()
        try:
            async with self._client(metadata) as client:
                token = await client.fetch_token(
                    metadata.token_endpoint,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=code_verifier,
                )
        except OAuthError as exc:
            # The provider's error code only: its description may echo what we sent.
            raise OidcError(
                "token_rejected", f"the token endpoint refused the code: {str(exc.error)[:100]}"
            ) from None
        except TRANSPORT_ERRORS as exc:
            raise ProviderUnavailable(f"token endpoint: {type(exc).__name__}") from None
        except ValueError:
            raise ProviderUnavailable("the token endpoint answered something not JSON") from None
        return dict(token)

    async def verify_id_token(
        self, id_token: object, *, nonce: str, access_token: str | None
    ) -> IdentityClaims:
        """Check the ID token's signature against the provider's keys, then iss, aud, exp,
        iat, nonce, azp and at_hash."""
        if not isinstance(id_token, str) or not id_token:
            raise OidcError("invalid_id_token", "the token endpoint returned no ID token")
        metadata = await self.metadata()
        try:
            try:
                token = jwt.decode(id_token, await self._key_set(), algorithms=metadata.algorithms)
            except InvalidKeyIdError:
                # The provider may have rotated its keys since we fetched them.
                keys = await self._key_set(refresh=True)
                token = jwt.decode(id_token, keys, algorithms=metadata.algorithms)
            claims = CodeIDToken(
                token.claims,
                token.header,
                options={
                    "iss": {"essential": True, "value": metadata.issuer},
                    "aud": {"essential": True, "value": self.client_id},
                    "sub": {"essential": True},
                    "exp": {"essential": True},
                },
                params={"nonce": nonce, "client_id": self.client_id, "access_token": access_token},
            )
            claims.validate(leeway=ID_TOKEN_LEEWAY_S)
        except JoseError as exc:
            raise OidcError("invalid_id_token", f"ID token refused: {exc}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= 255:
            raise OidcError("invalid_id_token", "ID token refused: 'sub' is not 1-255 characters")
        return IdentityClaims(issuer=metadata.issuer, subject=subject, claims=dict(claims))
