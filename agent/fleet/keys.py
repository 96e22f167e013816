"""The fleet key and the signatures of what the agents of one fleet share (DESIGN §13).

The fleet key is ``HMAC-SHA256(client_secret, "dvs-agent fleet v1\\0" + client_id + "\\0" +
token URL + "\\0" + scope words sorted and space-joined)``, hex: agents with the same
credentials and endpoint find the same entries, a rotated secret names new ones, and the key
reveals nothing of the secret (nor matches the state file's keyed hash, which has no label).
A second key, derived the same way with the label ``"dvs-agent fleet mac v1"``, signs every
entry (:meth:`FleetKeys.sign`): only holders of the client secret can write what others adopt,
and an entry that fails its signature is not used (:meth:`FleetKeys.open`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import msgspec

from agent.models import MAX_ANSWER_BYTES, Credentials

FLEET_LABEL = b"dvs-agent fleet v1\0"
MAC_LABEL = b"dvs-agent fleet mac v1\0"
#: what every entry's ``kind`` field may say: the token document, the mint lease, the marker
KINDS = ("token", "lease", "marker")


def fleet_material(credentials: Credentials, token_url: str, scope: str | None) -> bytes:
    """What both keys are derived from, after their labels."""
    words = " ".join(sorted((scope or "").split()))
    return b"\0".join(part.encode() for part in (credentials.client_id, token_url, words))


@dataclass(frozen=True, slots=True)
class FleetKeys:
    """The fleet key of one set of credentials and endpoint, and the key that signs entries."""

    #: hex; names the fleet's entries in the store (safe to show)
    key: str
    _mac_key: bytes = field(repr=False)

    @classmethod
    def derive(cls, credentials: Credentials, token_url: str, scope: str | None) -> FleetKeys:
        secret = credentials.client_secret.reveal().encode()
        material = fleet_material(credentials, token_url, scope)
        key = hmac.new(secret, FLEET_LABEL + material, hashlib.sha256).hexdigest()
        mac_key = hmac.new(secret, MAC_LABEL + material, hashlib.sha256).digest()
        return cls(key=key, _mac_key=mac_key)

    def sign(self, kind: str, fields: dict[str, Any]) -> bytes:
        """``fields`` as a JSON object with ``kind``, ``fleet`` and its ``hmac`` added."""
        body = {**fields, "kind": kind, "fleet": self.key}
        body["hmac"] = self._mac(body)
        return msgspec.json.encode(body, order="sorted")

    def open(self, kind: str, raw: bytes) -> dict[str, Any] | None:
        """The fields of an entry of ``kind`` signed with this key; None when it is not one
        (not JSON, too big, another kind or fleet, a signature that does not match)."""
        if len(raw) > MAX_ANSWER_BYTES:
            return None
        try:
            body = msgspec.json.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(body, dict):
            return None
        mac = body.pop("hmac", None)
        if not isinstance(mac, str) or body.get("kind") != kind or body.get("fleet") != self.key:
            return None
        try:
            expected = self._mac(body)
        except (TypeError, ValueError, RecursionError):
            return None
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            return None
        return body

    def _mac(self, body: dict[str, Any]) -> str:
        payload = msgspec.json.encode(body, order="sorted")
        return hmac.new(self._mac_key, payload, hashlib.sha256).hexdigest()
