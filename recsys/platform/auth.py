"""API keys and admin users: creation, revocation and checks, with no web framework in sight.

API keys are 32 random bytes; only their SHA-256 is stored (a high-entropy token needs no slow
hash), with a short prefix so an operator can tell keys apart. Admin passwords are hashed with
werkzeug's salted scrypt/pbkdf2, since people choose weak ones.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash

from recsys.config import Settings
from recsys.platform import broker
from recsys.platform.db import get_engine, session_scope
from recsys.platform.models import AdminUser, ApiKey

log = logging.getLogger(__name__)

KEY_PREFIX = "rsk_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD_LENGTH = 8
# Writing last_used_at on every request would turn each read into a write; once a minute is enough.
LAST_USED_RESOLUTION = timedelta(seconds=60)
# Admin login guessing: this many failures from one address within the window lock that address out
# until the window (counted from the first failure) ends.
LOGIN_FAILURES_ALLOWED = 10
LOGIN_FAILURE_WINDOW_SECONDS = 15 * 60


class AuthError(ValueError):
    """Bad input to a key or user operation; the message is one line for the user."""


@dataclass(frozen=True)
class ApiKeyInfo:
    id: int
    name: str
    key_prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "key_prefix": self.key_prefix,
            "created_at": self.created_at.isoformat(),
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "active": self.active,
        }


def _check_name(name: str, what: str) -> str:
    name = (name or "").strip()
    if not NAME_PATTERN.match(name):
        raise AuthError(f"{what} name must be 1-64 letters, digits or _.@- (starting with a letter or digit)")
    return name


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(row.id, row.name, row.key_prefix, row.created_at, row.last_used_at, row.revoked_at)


def create_api_key(name: str, settings: Settings) -> str:
    """Create a key called `name` and return it; this is the only time the key is seen."""
    name = _check_name(name, "key")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        with session_scope(settings) as session:
            session.add(ApiKey(name=name, key_prefix=key[: len(KEY_PREFIX) + 6], key_hash=hash_key(key)))
    except IntegrityError as exc:
        raise AuthError(f"an API key named {name!r} already exists") from exc
    return key


def revoke_api_key(name: str, settings: Settings) -> bool:
    """Revoke the key called `name`; False when there is no active key by that name."""
    with session_scope(settings) as session:
        result = session.execute(
            update(ApiKey)
            .where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        return result.rowcount > 0


def list_api_keys(settings: Settings) -> list[ApiKeyInfo]:
    with session_scope(settings) as session:
        return [_info(row) for row in session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))]


def verify_api_key(key: str | None, settings: Settings) -> ApiKeyInfo | None:
    """The active key matching `key`, or None (unknown, revoked, or empty)."""
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    digest = hash_key(key)
    engine = get_engine(settings)
    with engine.connect() as conn:
        row = conn.execute(
            select(ApiKey.id, ApiKey.name, ApiKey.key_prefix, ApiKey.created_at, ApiKey.last_used_at,
                   ApiKey.revoked_at).where(ApiKey.key_hash == digest)
        ).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    now = datetime.now(UTC)
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        with engine.begin() as conn:
            conn.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
    return ApiKeyInfo(row.id, row.name, row.key_prefix, row.created_at, now, None)


class ApiKeyCache:
    """Remembers keys verified in the last `ttl` seconds, so a busy API does not ask Postgres on every request.

    Only valid keys are kept (at most `max_entries`); a revoked key stops working within `ttl`.
    """

    def __init__(self, ttl: float, max_entries: int = 1024, clock=time.monotonic):
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, tuple[float, ApiKeyInfo]] = {}
        self._lock = threading.Lock()

    def verify(self, key: str | None, settings: Settings) -> ApiKeyInfo | None:
        if self.ttl <= 0 or not key:
            return verify_api_key(key, settings)
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and now - entry[0] < self.ttl:
            return entry[1]
        info = verify_api_key(key, settings)
        with self._lock:
            if info is None:
                self._entries.pop(key, None)
            else:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                self._entries[key] = (now, info)
        return info


def create_admin_user(name: str, password: str, settings: Settings) -> None:
    """Add an admin; an existing name gets the new password (so a forgotten one can be reset)."""
    name = _check_name(name, "user")
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise AuthError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    password_hash = generate_password_hash(password)
    with session_scope(settings) as session:
        user = session.scalars(select(AdminUser).where(AdminUser.name == name)).one_or_none()
        if user is None:
            session.add(AdminUser(name=name, password_hash=password_hash))
        else:
            user.password_hash = password_hash
            user.disabled_at = None


def admin_user_exists(name: str, settings: Settings) -> bool:
    with get_engine(settings).connect() as conn:
        return conn.execute(select(AdminUser.id).where(AdminUser.name == name)).first() is not None


def disable_admin_user(name: str, settings: Settings) -> bool:
    with session_scope(settings) as session:
        result = session.execute(
            update(AdminUser)
            .where(AdminUser.name == name, AdminUser.disabled_at.is_(None))
            .values(disabled_at=datetime.now(UTC))
        )
        return result.rowcount > 0


def list_admin_users(settings: Settings) -> list[dict]:
    with session_scope(settings) as session:
        users = session.scalars(select(AdminUser).order_by(AdminUser.name)).all()
        return [
            {
                "name": u.name,
                "created_at": u.created_at.isoformat(),
                "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None,
                "disabled": u.disabled_at is not None,
            }
            for u in users
        ]


def authenticate_admin(name: str, password: str, settings: Settings) -> bool:
    """True when `name` is an enabled admin with this password; records the login."""
    if not name or not password or len(name) > 64 or len(password) > 1024:
        return False
    with session_scope(settings) as session:
        user = session.scalars(select(AdminUser).where(AdminUser.name == name)).one_or_none()
        if user is None or user.disabled_at is not None:
            # Same work either way, so response time does not reveal which names exist.
            check_password_hash(_dummy_hash(), password)
            return False
        if not check_password_hash(user.password_hash, password):
            return False
        user.last_login_at = datetime.now(UTC)
        return True


@cache
def _dummy_hash() -> str:
    return generate_password_hash(secrets.token_hex(8))


# ---------------------------------------------------------------- login throttling


def _failures_key(address: str, settings: Settings) -> str:
    return f"recsys:login-failures:{settings.db_name}:{address}"


def login_lockout_seconds(address: str, settings: Settings) -> int:
    """Seconds until `address` may try to log in again; 0 when it may now.

    The counters live in the broker, so every web process sees the same ones. A broker that
    cannot be reached does not lock anyone out (logged): logins must not depend on it.
    """
    try:
        client = broker.redis_client(settings)
        key = _failures_key(address, settings)
        failures = int(client.get(key) or 0)
        if failures < LOGIN_FAILURES_ALLOWED:
            return 0
        return max(int(client.ttl(key)), 1)
    except Exception as exc:
        log.warning("login throttling is off: the broker cannot be reached (%s)", exc)
        return 0


def record_login_failure(address: str, settings: Settings) -> None:
    try:
        client = broker.redis_client(settings)
        key = _failures_key(address, settings)
        with client.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, LOGIN_FAILURE_WINDOW_SECONDS, nx=True)
            pipe.execute()
    except Exception as exc:
        log.warning("a failed login from %s was not counted: %s", address, exc)


def clear_login_failures(address: str, settings: Settings) -> None:
    try:
        broker.redis_client(settings).delete(_failures_key(address, settings))
    except Exception as exc:
        log.warning("failed-login counter of %s not cleared: %s", address, exc)
