"""The OpenID Connect provider, as a relying party sees it: its discovery document and keys
(both cached), the authorization URL, the code exchange and the ID token's validation.

Authlib does the protocol: it builds the authorization request (with the PKCE challenge) and
``CodeIDToken`` checks the ID token's claims. The token's signature is checked by joserfc, the
JOSE library Authlib itself now runs on. Every call to the provider (discovery, keys, token
endpoint) goes through one HTTP client, with a deadline on the whole exchange, not only
between two bytes, and a cap on the size of the answer: a slow or hostile provider can neither
hold a sign-in open nor fill the memory. No token, code or secret is ever logged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote_plus, urlsplit

import httpx
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key, KeySet

from legator.core.config import Settings, is_loopback_url
from legator.core.logging import get_logger

log = get_logger("legator.auth.oidc")
DISCOVERY_PATH = "/.well-known/openid-configuration"
CACHE_TTL_S = 3600.0
FAILURE_TTL_S = 10.0  # a failed discovery or key fetch is remembered (and answered) this long
# How long past its expiry a discovery document or key set is used on when its refresh fails.
STALE_GRACE_S = 24 * 3600.0
JWKS_MIN_REFRESH_S = 30.0  # an unknown key id refetches the keys at most this often
HTTP_TIMEOUT_S = 10.0  # for one call to the provider, from connecting to the last byte
ID_TOKEN_LEEWAY_S = 60  # clock skew allowed on exp, nbf and iat
MAX_DOCUMENT_BYTES = 512 * 1024  # discovery document, key set, token endpoint answer
MAX_KEYS = 50  # keys read from the key set; a provider publishes a handful
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


def _endpoint_allowed(issuer: str, url: str) -> bool:
    """Endpoints are https. Only a loopback http issuer (the settings allow one, for
    development) may name http endpoints, and then on a loopback address too: never a
    plain-text hop to another machine, whatever the discovery document says."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if not parts.hostname or parts.username is not None:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and is_loopback_url(issuer) and is_loopback_url(url)


def _strings(value: object) -> tuple[str, ...]:
    return tuple(item for item in value if isinstance(item, str)) if isinstance(value, list) else ()


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
        if not isinstance(value, str) or not _endpoint_allowed(issuer, value):
            raise ProviderUnavailable(f"the discovery document has no usable {name}")
        urls[name] = value
    methods = _strings(document.get("token_endpoint_auth_methods_supported"))
    methods = methods or ("client_secret_basic",)
    advertised = _strings(document.get("id_token_signing_alg_values_supported")) or ("RS256",)
    algorithms = tuple(alg for alg in ASYMMETRIC_ALGORITHMS if alg in advertised)
    if not algorithms:
        raise ProviderUnavailable(
            "the provider signs ID tokens with none of " + ", ".join(ASYMMETRIC_ALGORITHMS)
        )
    return ProviderMetadata(
        issuer=issuer,
        token_auth_methods=methods,
        algorithms=algorithms,
        **urls,
    )


T = TypeVar("T")


class _Cached(Generic[T]):
    """A document from the provider, kept CACHE_TTL_S. A failed fetch is remembered for
    FAILURE_TTL_S and answered meanwhile without asking again. When a refresh fails, the
    document fetched before is used on, up to STALE_GRACE_S past its expiry, with a warning
    per failed fetch: a provider down for a while (or a bad deploy of it) does not stop the
    sign-ins that what we hold can still check. With nothing fetched yet, a failure fails."""

    def __init__(self, what: str, fetch: Callable[[], Awaitable[T]]) -> None:
        self.what = what
        self._fetch = fetch
        self._lock = asyncio.Lock()
        self.value: T | None = None
        self.fetched_at = 0.0  # time.monotonic() of the fetch of ``value``
        self._failure: tuple[float, str] | None = None  # (until, why)

    def fresh(self, max_age: float = CACHE_TTL_S) -> T | None:
        if self.value is not None and time.monotonic() - self.fetched_at < max_age:
            return self.value
        return None

    async def get(self, *, max_age: float = CACHE_TTL_S, stale_ok: bool = True) -> T:
        """The document, fetched again once older than ``max_age``; ``stale_ok=False`` when
        only a new one will do (an unknown key id)."""
        async with self._lock:  # one fetch at a time, however many sign-ins ask
            value = self.fresh(max_age)
            if value is not None:
                return value
            age = time.monotonic() - self.fetched_at
            stale = self.value if stale_ok and age < CACHE_TTL_S + STALE_GRACE_S else None
            failure = self._failure
            if failure is not None and failure[0] > time.monotonic():
                if stale is not None:
                    return stale
                raise ProviderUnavailable(failure[1])
            try:
                value = await self._fetch()
            except ProviderUnavailable as exc:
                self._failure = (time.monotonic() + FAILURE_TTL_S, str(exc))
                if stale is None:
                    raise
                log.warning(
                    "identity provider refresh failed; using the cached copy",
                    document=self.what,
                    error=str(exc),
                    expired_s_ago=int(age - CACHE_TTL_S),
                )
                return stale
            self.value, self.fetched_at, self._failure = value, time.monotonic(), None
            return value


class OidcProvider:
    """One configured provider. Safe to share between concurrent sign-ins."""

    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_enabled, "OidcProvider needs the OIDC settings"
        self.issuer: str = settings.oidc_issuer or ""
        self.client_id: str = settings.oidc_client_id or ""
        self.redirect_url: str = settings.oidc_redirect_url or ""
        self.scopes = settings.oidc_scopes
        self.timeout_s = HTTP_TIMEOUT_S
        self._secret = settings.oidc_client_secret
        self._http = httpx.AsyncClient(
            timeout=HTTP_TIMEOUT_S,
            follow_redirects=False,
            # Uncompressed: the size cap then bounds what is held, not what is inflated.
            headers={"Accept": "application/json", "Accept-Encoding": "identity"},
        )
        self._metadata = _Cached("discovery document", self._fetch_metadata)
        self._keys = _Cached("key set", self._fetch_keys)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, what: str, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        """One call to the provider: the status and the JSON answer (None when the body is not
        JSON), within ``timeout_s`` in all and MAX_DOCUMENT_BYTES."""
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._http.stream(method, url, **kwargs) as response:
                    length = response.headers.get("content-length", "")
                    if length.isdigit() and int(length) > MAX_DOCUMENT_BYTES:
                        raise _too_large(what, url)
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_DOCUMENT_BYTES:
                            raise _too_large(what, url)
                    status = response.status_code
        except TimeoutError:
            raise ProviderUnavailable(
                f"{what} at {url} did not answer within {self.timeout_s:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"{what} at {url}: {type(exc).__name__}") from None
        try:
            return status, json.loads(body)
        except (ValueError, RecursionError):  # deeply nested arrays exhaust the recursion limit
            return status, None

    async def _get_json(self, url: str, what: str) -> Any:
        status, document = await self._call(what, "GET", url)
        if status != 200:
            raise ProviderUnavailable(f"{what} at {url} answered HTTP {status}")
        if document is None:
            raise ProviderUnavailable(f"{what} at {url} is not JSON")
        return document

    async def metadata(self) -> ProviderMetadata:
        """The discovery document, fetched once an hour (see _Cached for failures)."""
        cached = self._metadata.fresh()  # without the lock: asked at every /login
        return cached if cached is not None else await self._metadata.get()

    async def _fetch_metadata(self) -> ProviderMetadata:
        url = self.issuer.rstrip("/") + DISCOVERY_PATH
        return parse_metadata(self.issuer, await self._get_json(url, "discovery document"))

    async def _key_set(self, *, refresh: bool = False) -> KeySet:
        """The provider's signing keys, fetched once an hour, or sooner on ``refresh`` (an
        unknown key id) but at most every JWKS_MIN_REFRESH_S, however many sign-ins ask at
        once: a token naming keys that do not exist cannot make us hammer the provider."""
        if refresh:
            return await self._keys.get(max_age=JWKS_MIN_REFRESH_S, stale_ok=False)
        return await self._keys.get()

    async def _fetch_keys(self) -> KeySet:
        metadata = await self.metadata()
        document = await self._get_json(metadata.jwks_uri, "key set")
        raw = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(raw, list):
            raise ProviderUnavailable("the provider's key set has no 'keys' list")
        keys: list[Key] = []
        for entry in raw[:MAX_KEYS]:
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
        return KeySet(keys)

    async def authorization_url(self, *, state: str, nonce: str, code_verifier: str) -> str:
        metadata = await self.metadata()
        url: str = prepare_grant_uri(
            metadata.authorization_endpoint,
            client_id=self.client_id,
            response_type="code",
            redirect_uri=self.redirect_url,
            scope=self.scopes,
            state=state,
            nonce=nonce,
            code_challenge=create_s256_code_challenge(code_verifier),
            code_challenge_method="S256",
        )
        return url

    async def exchange_code(self, code: str, code_verifier: str) -> dict[str, Any]:
        """The token endpoint's answer for an authorization code (with the PKCE verifier)."""
        metadata = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_url,
            "code_verifier": code_verifier,
        }
        auth: httpx.BasicAuth | None = None
        secret = self._secret.get_secret_value() if self._secret is not None else None
        if secret is None:
            form["client_id"] = self.client_id  # a public client: PKCE is its only proof
        elif "client_secret_basic" in metadata.token_auth_methods:
            # RFC 6749 §2.3.1: each form-urlencoded before they are joined with ":".
            auth = httpx.BasicAuth(quote_plus(self.client_id), quote_plus(secret))
        else:
            form |= {"client_id": self.client_id, "client_secret": secret}
        status, answer = await self._call(
            "token endpoint", "POST", metadata.token_endpoint, data=form, auth=auth
        )
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, str):
            # The provider's error code only: its description may echo what we sent.
            raise OidcError(
                "token_rejected", f"the token endpoint refused the code: {error[:100]!r}"
            )
        if status != 200:
            raise ProviderUnavailable(f"the token endpoint answered HTTP {status}")
        if not isinstance(answer, dict):
            raise ProviderUnavailable("the token endpoint answered something not a JSON object")
        return answer

    async def verify_id_token(
        self, id_token: object, *, nonce: str, access_token: str | None
    ) -> IdentityClaims:
        """Check the ID token's signature against the provider's keys, then iss, aud, exp,
        iat, nonce, azp and at_hash."""
        if not isinstance(id_token, str) or not id_token:
            raise OidcError("invalid_id_token", "the token endpoint returned no ID token")
        metadata = await self.metadata()
        try:
            keys = await self._signing_keys(id_token)
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

    async def _signing_keys(self, id_token: str) -> KeySet:
        """The keys to check ``id_token`` with. A ``kid`` we do not know refetches the key set
        (the provider may have rotated its keys), at most every JWKS_MIN_REFRESH_S; no
        ``kid`` is accepted only when the provider has a single key (OIDC Core §10.1)."""
        kid = jws.extract_compact(id_token.encode()).headers().get("kid")
        keys = await self._key_set()
        if kid is None:
            if len(keys.keys) != 1:
                raise OidcError(
                    "invalid_id_token",
                    "ID token refused: no 'kid' in its header and the provider has several keys",
                )
            return keys
        if not isinstance(kid, str) or not 0 < len(kid) <= 256:
            raise OidcError("invalid_id_token", "ID token refused: its 'kid' is not a string")
        if not _has_kid(keys, kid):
            keys = await self._key_set(refresh=True)
            if not _has_kid(keys, kid):
                raise OidcError(
                    "invalid_id_token", f"ID token refused: unknown key id {kid[:64]!r}"
                )
        return keys


def _has_kid(keys: KeySet, kid: str) -> bool:
    return any(key.kid == kid for key in keys.keys)


def _too_large(what: str, url: str) -> ProviderUnavailable:
    return ProviderUnavailable(f"{what} at {url} is larger than {MAX_DOCUMENT_BYTES} bytes")
