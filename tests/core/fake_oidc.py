"""A fake OpenID Connect provider that speaks the real wire format, served by uvicorn on a
loopback port: discovery document, JWKS, an authorization endpoint that redirects back with
``code`` and ``state``, and a token endpoint that checks client authentication and the PKCE
verifier and returns an RS256-signed ID token. Tests turn its knobs to make it misbehave."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus, urlencode

import uvicorn
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import free_port

CLIENT_ID = "legator-test"
CLIENT_SECRET = "fake-provider-client-secret"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Grant:
    redirect_uri: str
    code_challenge: str
    nonce: str
    person: dict[str, Any]


@dataclass
class Knobs:
    """How the provider misbehaves; reset before every test."""

    deny: bool = False  # the authorization endpoint answers error=access_denied
    claims: dict[str, Any] = field(default_factory=dict)  # override ID token claims
    sign_with_other_key: bool = False  # same kid, another key: a bad signature
    token_endpoint_down: bool = False  # the token endpoint answers 503
    jwks_status: int = 200  # anything else: the key set answers that
    discovery: dict[str, Any] = field(default_factory=dict)  # override discovery fields
    discovery_status: int = 200  # anything else: the discovery document answers that
    drip_s: float = 0.0  # > 0: the discovery document comes a few bytes at a time
    huge: str = ""  # "discovery", "jwks" or "token": that endpoint answers megabytes
    deep: bool = False  # the discovery document is a deeply nested JSON array
    extra_key: bool = False  # the key set holds a second signing key (kid "k2")
    # How the ID token is signed: "" (RS256, kid k1), "none" (no signature), "hs256" (HMAC
    # with the client secret as the key: the classic algorithm confusion).
    forge: str = ""


def _forged_id_token(how: str, claims: dict[str, Any], key: RSAKey) -> str:
    if how == "none":
        header = b64url(json.dumps({"alg": "none", "kid": "k1"}).encode())
        return f"{header}.{b64url(json.dumps(claims).encode())}."
    if how == "hs256":
        secret = OctKey.import_key(CLIENT_SECRET.encode())
        return jwt.encode({"alg": "HS256", "kid": "k1"}, claims, secret, algorithms=["HS256"])
    return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)


async def _megabytes() -> AsyncIterator[bytes]:
    yield b'{"pad": "'
    for _ in range(64):
        yield b"x" * 32768  # 2 MiB in all, chunked: no Content-Length to go by
    yield b'"}'


class FakeProvider:
    def __init__(self, client_id: str = CLIENT_ID, client_secret: str = CLIENT_SECRET) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"}, private=True)
        self.other_key = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
        self.second_key = RSAKey.generate_key(2048, parameters={"kid": "k2"}, private=True)
        self.hits: Counter[str] = Counter()  # requests per path
        self.person: dict[str, Any] = {}
        self.knobs = Knobs()
        self.grants: dict[str, Grant] = {}
        self.token_requests: list[dict[str, str]] = []
        self.token_auth: list[str] = []  # the Authorization header of each token request
        self.authorize_requests: list[dict[str, str]] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ----- endpoints ---------------------------------------------------------------------

    async def discovery(self, _request: Request) -> Response:
        self.hits["discovery"] += 1
        if self.knobs.discovery_status != 200:
            return JSONResponse({"error": "down"}, status_code=self.knobs.discovery_status)
        if self.knobs.huge == "discovery":
            return StreamingResponse(_megabytes(), media_type="application/json")
        if self.knobs.deep:
            return Response("[" * 100_000 + "]" * 100_000, media_type="application/json")
        document = {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "email", "profile"],
            **self.knobs.discovery,
        }
        if self.knobs.drip_s > 0:
            return StreamingResponse(self._drip(json.dumps(document).encode()))
        return JSONResponse(document)

    async def _drip(self, body: bytes) -> AsyncIterator[bytes]:
        step = max(1, len(body) // 20)
        for start in range(0, len(body), step):
            await asyncio.sleep(self.knobs.drip_s)
            yield body[start : start + step]

    async def jwks(self, _request: Request) -> Response:
        self.hits["jwks"] += 1
        if self.knobs.jwks_status != 200:
            return JSONResponse({"error": "down"}, status_code=self.knobs.jwks_status)
        if self.knobs.huge == "jwks":
            return StreamingResponse(_megabytes(), media_type="application/json")
        keys = [self.key.as_dict(private=False)]
        if self.knobs.extra_key:
            keys.append(self.second_key.as_dict(private=False))
        return JSONResponse({"keys": keys})

    async def authorize(self, request: Request) -> Response:
        params = dict(request.query_params)
        self.authorize_requests.append(params)
        problems = []
        if params.get("response_type") != "code":
            problems.append("response_type")
        if params.get("client_id") != self.client_id:
            problems.append("client_id")
        if "openid" not in params.get("scope", "").split():
            problems.append("scope")
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            problems.append("pkce")
        if not params.get("state") or not params.get("nonce"):
            problems.append("state/nonce")
        if problems:
            return JSONResponse({"error": "invalid_request", "bad": problems}, status_code=400)
        redirect_uri = params["redirect_uri"]
        if self.knobs.deny:
            query = {"error": "access_denied", "state": params["state"]}
            return RedirectResponse(f"{redirect_uri}?{urlencode(query)}", status_code=302)
        code = secrets.token_urlsafe(24)
        self.grants[code] = Grant(
            redirect_uri, params["code_challenge"], params["nonce"], dict(self.person)
        )
        query = {"code": code, "state": params["state"]}
        return RedirectResponse(f"{redirect_uri}?{urlencode(query)}", status_code=302)

    def _client_authenticated(self, request: Request) -> bool:
        """RFC 6749 §2.3.1: Basic credentials whose id and secret were each form-urlencoded
        before being joined with ':' (so neither holds a ':' once encoded)."""
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(header.removeprefix("Basic "), validate=True).decode()
        except ValueError:
            return False
        client_id, colon, secret = decoded.partition(":")
        if not colon or ":" in secret:
            return False
        return unquote_plus(client_id) == self.client_id and secrets.compare_digest(
            unquote_plus(secret).encode(), self.client_secret.encode()
        )

    async def token(self, request: Request) -> Response:
        form = {key: str(value) for key, value in (await request.form()).items()}
        self.token_requests.append(form)
        self.token_auth.append(request.headers.get("authorization", ""))
        self.hits["token"] += 1
        if self.knobs.token_endpoint_down:
            return Response("upstream unavailable", status_code=503)
        if self.knobs.huge == "token":
            return StreamingResponse(_megabytes(), media_type="application/json")
        if not self._client_authenticated(request):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if form.get("grant_type") != "authorization_code":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        grant = self.grants.pop(form.get("code", ""), None)  # a code works once
        if grant is None or form.get("redirect_uri") != grant.redirect_uri:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        verifier = form.get("code_verifier", "")
        if b64url(hashlib.sha256(verifier.encode()).digest()) != grant.code_challenge:
            return JSONResponse({"error": "invalid_grant", "why": "pkce"}, status_code=400)
        access_token = secrets.token_urlsafe(32)
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.client_id,
            "iat": now,
            "exp": now + 300,
            "nonce": grant.nonce,
            "at_hash": b64url(hashlib.sha256(access_token.encode()).digest()[:16]),
            **grant.person,
            **self.knobs.claims,
        }
        key = self.other_key if self.knobs.sign_with_other_key else self.key
        id_token = _forged_id_token(self.knobs.forge, claims, key)
        return JSONResponse(
            {
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": 300,
                "id_token": id_token,
            },
            headers={"Cache-Control": "no-store"},
        )

    # ----- lifecycle ---------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
            ]
        )

    def start(self) -> FakeProvider:
        config = uvicorn.Config(
            self.app(), host="127.0.0.1", port=self.port, log_config=None, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake OIDC provider did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
