"""Signed requests that change a probe: apply a policy, rotate its key, update it, files."""

from __future__ import annotations

import posixpath
from typing import Any

from pydantic import ValidationError

from legator.core.audit.service import AuditService
from legator.core.db import Database, new_id
from legator.core.errors import BadRequest, Forbidden, NotFound, ServiceUnavailable
from legator.core.http.errors import validation_details
from legator.core.security import sha256_hex
from legator.fleet.commands.service import CommandService
from legator.fleet.hub import Hub, ProbeNotConnected
from legator.fleet.models import Probe
from legator.fleet.policies import PolicyService
from legator.fleet.protocol import (
    SIGNING_KEY_ROTATED,
    T_FILE_REQUEST,
    T_POLICY_UPDATE,
    T_ROTATE_KEY,
    T_UPDATE,
    Ack,
    FileRequest,
    FileResult,
    PolicySpec,
    RotateKey,
    UpdateSpec,
    new_key_salt,
)
from legator.fleet.registry import ProbeRegistry, new_probe_key
from legator.fleet.schemas import ProbeActionResult, UpdateRequest


def path_allowed(path: str, roots: list[str] | tuple[str, ...]) -> bool:
    """Lexical check on the control plane; the probe repeats it on the resolved path."""
    if not path.startswith("/"):
        return False
    clean = posixpath.normpath(path)
    return any(
        root == "/" or clean == root.rstrip("/") or clean.startswith(root.rstrip("/") + "/")
        for root in roots
    )


class ProbeActions:
    def __init__(
        self,
        db: Database,
        audit: AuditService,
        hub: Hub,
        registry: ProbeRegistry,
        policies: PolicyService,
        commands: CommandService,
    ) -> None:
        self.db = db
        self.audit = audit
        self.hub = hub
        self.registry = registry
        self.policies = policies
        self.commands = commands

    async def policy_spec(self, policy_id: str) -> PolicySpec:
        policy = await self.policies.get(policy_id)
        return PolicySpec(
            policy_id=policy.id,
            name=policy.name,
            level=policy.level,  # type: ignore[arg-type]
            allow=policy.allow,
            block=policy.block,
            paths=policy.paths,
        )

    async def push_policy(self, probe_id: str) -> Ack:
        probe = await self.registry.get(probe_id)
        spec = await self.policy_spec(probe.policy_id)
        return await self._ack(probe_id, T_POLICY_UPDATE, spec)

    async def apply_policy(self, probe_id: str, policy_id: str, *, actor: str) -> ProbeActionResult:
        spec = await self.policy_spec(policy_id)
        async with self.db.write() as session:
            probe = await session.get(Probe, probe_id)
            if probe is None:
                raise NotFound(f"no probe with id {probe_id}")
            previous, probe.policy_id = probe.policy_id, policy_id
            await self.audit.record(
                session,
                actor=actor,
                action="fleet.policy.apply",
                target=probe_id,
                details={"policy_id": policy_id, "previous": previous},
            )
        if not self.hub.is_connected(probe_id):
            return ProbeActionResult(
                probe_id=probe_id,
                ok=True,
                detail={
                    "policy_id": policy_id,
                    "delivered": False,
                    "note": "the probe gets it when it next connects",
                },
            )
        ack = await self._ack(probe_id, T_POLICY_UPDATE, spec)
        return ProbeActionResult(
            probe_id=probe_id,
            ok=ack.ok,
            error=ack.error,
            detail={"policy_id": policy_id, "delivered": True, **ack.detail},
        )

    async def rotate_key(self, probe_id: str, *, actor: str) -> ProbeActionResult:
        """A new probe key and, with it, a new signing key (a new salt), sent signed with
        the current one. The probe saves both, then verifies with the new signing key; its
        ack promotes them here, and its connection (on whichever replica holds it) signs with
        the new key from then on. A probe that predates signing key rotation keeps its
        signing key (its ack does not say it took the new one)."""
        await self.registry.get(probe_id)
        new_key, salt = new_probe_key(), new_key_salt()
        await self.registry.set_pending_key(probe_id, new_key, salt)
        spec = RotateKey(api_key=new_key, signing_key=self.hub.key_for(probe_id, salt))
        try:
            ack = await self._ack(probe_id, T_ROTATE_KEY, spec)
        except ProbeNotConnected:
            raise
        except ServiceUnavailable:
            # The probe may have saved the new keys without its ack arriving: a connection
            # still signing with the old key would have every message refused, so it ends;
            # the probe reconnects with whichever key it holds (the new one is promoted then).
            await self.hub.disconnect(probe_id, code=4000, reason="key rotation unconfirmed")
            raise
        if not ack.ok:
            raise BadRequest(f"probe {probe_id} could not store its new key: {ack.error}")
        signing = ack.detail.get("signing_key") == SIGNING_KEY_ROTATED
        current = await self.registry.promote_key(probe_id, sha256_hex(new_key), signing=signing)
        if signing and current == salt and not await self.hub.refresh_key(probe_id):
            # Whatever still holds its socket signs with the old key: the probe reconnects.
            await self.hub.disconnect(probe_id, code=4000, reason="signing key rotated")
        await self.audit.log(
            actor=actor,
            action="fleet.probe.rotate_key",
            target=probe_id,
            details={"signing_rotated": signing},  # "signing_key" is redacted
        )
        detail: dict[str, Any] = {"rotated": True, "signing_key_rotated": signing}
        if not signing:
            detail["note"] = (
                "the probe kept its signing key (it predates signing key rotation): "
                "update it and rotate again, or re-enrol it"
            )
        return ProbeActionResult(probe_id=probe_id, ok=True, detail=detail)

    async def update(self, probe_id: str, body: UpdateRequest, *, actor: str) -> ProbeActionResult:
        await self.registry.get(probe_id)
        spec = UpdateSpec(
            request_id=new_id(), url=body.url, version=body.version, sha256=body.sha256
        )
        ack = await self._ack(probe_id, T_UPDATE, spec, wait_s=120)
        await self.audit.log(
            actor=actor,
            action="fleet.probe.update",
            target=probe_id,
            outcome="success" if ack.ok else "failure",
            details={
                "url": body.url,
                "version": body.version,
                "sha256": body.sha256,
                "error": ack.error,
            },
        )
        if not ack.ok:
            raise BadRequest(f"probe {probe_id} refused the update: {ack.error}")
        return ProbeActionResult(probe_id=probe_id, ok=True, detail={"version": body.version})

    async def file_op(self, probe_id: str, request: dict[str, Any], *, actor: str) -> Any:
        probe = await self.registry.get(probe_id)
        policy, name = await self.commands.effective_policy(probe)
        try:
            spec = FileRequest(request_id=new_id(), **request)
        except ValidationError as exc:  # the REST route checks first; the brain and MCP not
            detail = validation_details(list(exc.errors()))[0]
            raise BadRequest(f"{detail['field']}: {detail['message']}") from None
        if not path_allowed(spec.path, policy.paths):
            raise Forbidden(
                f"policy {name!r} does not allow files under {spec.path!r} "
                f"(allowed: {', '.join(policy.paths) or 'none'})"
            )
        result = await self.hub.call(
            probe_id, T_FILE_REQUEST, spec, reply_key=spec.request_id, wait_s=30
        )
        assert isinstance(result, FileResult)
        await self.audit.log(
            actor=actor,
            action=f"fleet.file.{spec.op}",
            target=probe_id,
            outcome="success" if result.ok else "failure",
            details={"path": spec.path, "error": result.error},
        )
        if not result.ok:
            raise BadRequest(f"probe {probe_id}: {result.error}")
        return result.data

    async def _ack(self, probe_id: str, type_: str, payload: Any, *, wait_s: float = 30) -> Ack:
        reply = await self.hub.call(probe_id, type_, payload, wait_s=wait_s)
        assert isinstance(reply, Ack)
        return reply
