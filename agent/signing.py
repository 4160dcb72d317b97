"""Operator signatures: Ed25519 keys, signed model manifests and signed shadow updates.

Owns the one format of what an operator signs, and its checks (pure, no I/O but reading a key or a
manifest file). Opt-in: a board that trusts no key (``model.trusted_keys`` empty in its root-owned
config file) checks nothing here and behaves as before.

* A **public key** is written ``ed25519:<base64 of the 32 raw bytes>``; its **key id** is the first 16
  hex digits of the sha256 of those bytes. A private key is a PKCS#8 PEM file, mode 0600.
* A **model manifest** (``FILE.sig`` next to the model, or the same JSON text in ``model.signature``)::

    {"format": "edge-agent/model-signature/v1",
     "signed": {"file": "m.gguf", "sha256": "<64 hex>", "size": 1234, "version": 3,
                "expires": "2027-01-01T00:00:00Z", "downgrade": false},
     "key_id": "<16 hex>", "signature": "<base64 Ed25519 signature of canonical(signed) with a prefix>"}

* A **signed update** carries ``"signature": {"key_id", "expires", "sig"}`` next to ``state``; the
  signature covers the device id, the document version the update names, the desired patch and the
  expiry, so it cannot be replayed on another board, at another version or after it expired.

Every signature is over ``DOMAIN + canonical(payload)``: canonical JSON is sorted keys, no blanks,
UTF-8 (RFC 8785 gives the same bytes for the strings, integers and booleans used here), and the domain
prefix keeps a model signature from ever verifying as an update and the reverse.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import ModelError

if TYPE_CHECKING:
    # For annotations only: agent.config sits above this module and imports it (to parse trusted keys),
    # so a run-time import would be a cycle.
    from agent.config import Settings
    from agent.config.sections import ModelSettings

PrivateKey = Ed25519PrivateKey  # an operator's private key, as load_private_key returns it

KEY_PREFIX = "ed25519:"
MODEL_FORMAT = "edge-agent/model-signature/v1"
_MODEL_DOMAIN = b"edge-agent model signature v1\n"
_UPDATE_DOMAIN = b"edge-agent shadow update v1\n"
SIG_SUFFIX = ".sig"
MAX_MANIFEST_BYTES = 4096

# Shadow keys whose change makes a board fetch, load or execute something new: with trusted keys,
# an update that sets or removes any of them must be signed (docs/shadow.md, "Signed changes").
SIGNED_PREFIXES = ("model.", "download.")
SIGNED_KEYS = ("engine.chat_template", "canary.json_schema")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


class SignatureError(ModelError):
    """A model whose signature is missing, invalid, expired, for other bytes or by an unknown key."""

    code = "model_signature_invalid"


# --------------------------------------------------------------------------------------------
# Keys


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def public_key_text(public: Ed25519PublicKey) -> str:
    return KEY_PREFIX + base64.b64encode(_raw(public)).decode()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """``ed25519:<base64>`` -> the key; ValueError saying what is wrong."""
    if not text.startswith(KEY_PREFIX):
        raise ValueError(f"a trusted key is written 'ed25519:<base64 of 32 bytes>', got {text[:24]!r}")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError(f"trusted key {text[:24]!r}... is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"trusted key {text[:24]!r}... holds {len(raw)} bytes, an Ed25519 public key has 32")
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class Trust:
    """The public keys a board trusts, by key id. Empty: signatures are not required."""

    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Trust:
        keys = {}
        for t in texts:
            k = parse_public_key(t)
            keys[key_id(k)] = k
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def verify(self, kid: Any, signature: Any, message: bytes) -> str | None:
        """None when ``signature`` (base64) by ``kid`` verifies over ``message``, else why not."""
        if not isinstance(kid, str) or not _KEY_ID.match(kid):
            return f"key_id must be 16 hex digits, got {str(kid)[:40]!r}"
        key = self.keys.get(kid)
        if key is None:
            return f"signed by key {kid}, which this board does not trust (trusted: {', '.join(sorted(self.keys))})"
        if not isinstance(signature, str):
            return "the signature must be a base64 string"
        try:
            raw = base64.b64decode(signature, validate=True)
        except binascii.Error:
            return "the signature is not valid base64 (truncated or altered)"
        if len(raw) != 64:
            return f"the signature holds {len(raw)} bytes, an Ed25519 signature has 64 (truncated?)"
        try:
            key.verify(raw, message)
        except InvalidSignature:
            return f"the signature by key {kid} does not verify: what it signs was altered, or it is not its signature"
        return None


def generate_key(private_path: Path) -> tuple[Path, str]:
    """Write a new private key (PKCS#8 PEM, 0600, never overwritten) and ``private_path``.pub; return
    (public key file, public key text)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = public_key_text(key.public_key())
    pub_path = private_path.with_name(private_path.name + ".pub")
    pub_path.write_text(public + "\n")
    return pub_path, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"cannot read the private key {path}: {e}", code="key_invalid") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ModelError(f"{path} is not an Ed25519 private key", code="key_invalid")
    return key


def _b64sig(key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message)).decode()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(v: Any) -> float:
    if not isinstance(v, str) or not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", v):
        raise ValueError(f"expires must be a UTC time written YYYY-MM-DDTHH:MM:SSZ, got {str(v)[:40]!r}")
    return datetime.strptime(v, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelClaims:
    """What a verified manifest says about a model file."""

    file: str
    sha256: str
    size: int
    version: int | None
    expires: str | None
    downgrade: bool
    key_id: str


def sign_model(
    path: Path,
    key: Ed25519PrivateKey,
    *,
    sha256: str,
    version: int | None = None,
    expires: str | None = None,
    downgrade: bool = False,
) -> dict[str, Any]:
    """The manifest of ``path`` (its sha256 computed by the caller), signed by ``key``."""
    if expires is not None:
        _parse_time(expires)
    signed = {"file": path.name, "sha256": sha256, "size": path.stat().st_size, "version": version,
              "expires": expires, "downgrade": downgrade}  # fmt: skip
    return {
        "format": MODEL_FORMAT,
        "signed": signed,
        "key_id": key_id(key.public_key()),
        "signature": _b64sig(key, _MODEL_DOMAIN + canonical(signed)),
    }


def verify_manifest(text: str | bytes, trust: Trust, now: float) -> ModelClaims:
    """Read and verify a manifest; SignatureError naming exactly what is wrong."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise SignatureError(f"the model signature is {len(text)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise SignatureError(f"the model signature is not valid JSON (truncated?): {e}") from None
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT or not isinstance(data.get("signed"), dict):
        raise SignatureError(f"the model signature is not a manifest of format {MODEL_FORMAT}")
    signed = data["signed"]
    why = trust.verify(data.get("key_id"), data.get("signature"), _MODEL_DOMAIN + canonical(signed))
    if why is not None:
        raise SignatureError(f"model signature refused: {why}")
    # Signed by a trusted key: the fields were written by `edge-agent model sign`, still checked.
    file, sha, size = signed.get("file"), signed.get("sha256"), signed.get("size")
    version, expires, downgrade = signed.get("version"), signed.get("expires"), signed.get("downgrade", False)
    if not isinstance(file, str) or not isinstance(sha, str) or not _HEX64.match(sha) or type(size) is not int:
        raise SignatureError("the signed manifest lacks file, sha256 or size")
    if version is not None and type(version) is not int:
        raise SignatureError("the signed manifest's version is not an integer")
    if expires is not None:
        try:
            until = _parse_time(expires)
        except ValueError as e:
            raise SignatureError(f"the signed manifest's {e}") from None
        if now >= until:
            raise SignatureError(f"the model signature of {file} expired at {expires}; sign it again")
    return ModelClaims(file, sha, size, version, expires, downgrade is True, str(data["key_id"]))


def check_claims(
    claims: ModelClaims, *, name: str, sha256: str | None, size: int | None, running_version: int | None
) -> None:
    """That the manifest is for this file (name, bytes) and is not a rollback; SignatureError otherwise.
    ``sha256``/``size`` None: not known yet (checked again once the file is there)."""
    if claims.file != name:
        raise SignatureError(f"the signature is for the file {claims.file!r}, not {name!r}")
    if sha256 is not None and sha256 != claims.sha256:
        raise SignatureError(
            f"the signature is for other bytes: it signs sha256 {claims.sha256[:16]}..., "
            f"{name} has sha256 {sha256[:16]}..."
        )
    if size is not None and size != claims.size:
        raise SignatureError(f"the signature is for other bytes: it signs {claims.size} bytes, {name} has {size}")
    if running_version is not None and not claims.downgrade and (claims.version or 0) < running_version:
        raise SignatureError(
            f"rollback refused: {name} is signed as version {claims.version}, the running model as version "
            f"{running_version}; sign it again with a higher --version, or with --downgrade to allow going back"
        )


def manifest_text(signature: str | None, model_file: Path) -> str | bytes:
    """The manifest for a model: ``model.signature`` when set, else ``FILE.sig`` next to the file."""
    if signature is not None:
        return signature
    sig = model_file.with_name(model_file.name + SIG_SUFFIX)
    try:
        with open(sig, "rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise SignatureError(
            f"{model_file.name} is not signed: no model.signature and no {sig.name} next to it, "
            "and this board trusts only signed models (model.trusted_keys)"
        ) from None
    except OSError as e:
        raise SignatureError(f"cannot read {sig.name}: {e.strerror or e}") from None


def running_version(model: ModelSettings, model_file: Path, trust: Trust, now: float) -> int | None:
    """The signed version of the model in force (None: unsigned, unversioned or unreadable)."""
    try:
        return verify_manifest(manifest_text(model.signature, model_file), trust, now).version
    except SignatureError:
        return None


def verify_model_file(model: ModelSettings, path: Path, sha256: str, *, running: int | None, now: float) -> ModelClaims:
    """Before a model is loaded (``model``: its ModelSettings, with trusted keys): its manifest verifies,
    is for exactly these bytes and is not a rollback below ``running``. SignatureError otherwise."""
    claims = verify_manifest(manifest_text(model.signature, path), Trust.from_texts(model.trusted_keys), now)
    check_claims(claims, name=path.name, sha256=sha256, size=path.stat().st_size, running_version=running)
    return claims


def desired_model_problem(settings: Settings, *, running: int | None, now: float) -> str | None:
    """Why the model that ``settings`` (a board's Settings with desired applied) names may not be fetched
    or loaded, judged from its manifest before any byte of it is downloaded (None: it may)."""
    m = settings.model
    path = settings.device.models_dir / m.path
    size = m.size
    if size is None and m.url is None:  # a file on the board already: its size is known without reading it
        try:
            size = path.stat().st_size
        except OSError:
            size = None
    try:
        claims = verify_manifest(manifest_text(m.signature, path), Trust.from_texts(m.trusted_keys), now)
        check_claims(claims, name=path.name, sha256=m.sha256, size=size, running_version=running)
    except SignatureError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------------------------
# Shadow updates


def needs_signature(keys: Iterable[str]) -> list[str]:
    """The dotted keys (set or removed) that only a signed update may touch."""
    return sorted(
        k
        for k in keys
        if k.startswith(SIGNED_PREFIXES)
        or k in SIGNED_KEYS
        or k + "." in SIGNED_PREFIXES
        or any(s.startswith(k + ".") for s in SIGNED_KEYS)
    )


def _update_message(device: str, version: int, desired: Any, expires: str) -> bytes:
    return _UPDATE_DOMAIN + canonical({"device": device, "version": version, "desired": desired, "expires": expires})


def sign_update(
    desired: Mapping[str, Any] | None, *, device: str, version: int, key: Ed25519PrivateKey, expires: str
) -> dict[str, str]:
    """The ``signature`` object of an update of ``device`` naming document ``version``."""
    return {
        "key_id": key_id(key.public_key()),
        "expires": expires,
        "sig": _b64sig(key, _update_message(device, version, desired, expires)),
    }


def verify_update(
    signature: Any, desired: Any, *, device: str, version: int | None, trust: Trust, now: float
) -> str | None:
    """None when the update's signature holds, else why it is refused."""
    if signature is None:
        return "the update is unsigned (sign it: edge-agent shadow set --key KEY)"
    if not isinstance(signature, Mapping) or set(signature) != {"key_id", "expires", "sig"}:
        return "signature must be an object of key_id, expires and sig"
    if version is None:
        return "a signed update must name the document version it was signed for"
    try:
        until = _parse_time(signature["expires"])
    except ValueError as e:
        return f"signature {e}"
    if now >= until:
        return f"the signature expired at {signature['expires']} (an old update sent again?)"
    return trust.verify(
        signature["key_id"], signature["sig"], _update_message(device, version, desired, signature["expires"])
    )


__all__ = [
    "KEY_PREFIX",
    "MODEL_FORMAT",
    "SIGNED_KEYS",
    "SIGNED_PREFIXES",
    "ModelClaims",
    "PrivateKey",
    "SignatureError",
    "Trust",
    "canonical",
    "desired_model_problem",
    "check_claims",
    "generate_key",
    "iso",
    "key_id",
    "load_private_key",
    "manifest_text",
    "needs_signature",
    "parse_public_key",
    "public_key_text",
    "running_version",
    "sign_model",
    "sign_update",
    "verify_manifest",
    "verify_model_file",
    "verify_update",
]
