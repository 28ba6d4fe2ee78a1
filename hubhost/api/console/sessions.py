"""Console logins: one-time tokens and the sessions they open.

`hubhost console` asks the hub (an administrator on the Unix socket) for a login token of
some level; the printed URL carries it. The browser trades it, once, for a session cookie
(HttpOnly, SameSite=Strict, random); the session table lives here, in the hub's memory
only, so a hub restart logs everyone out. A session has the level of the token that opened
it. Both tables are small and bounded: the oldest entries make room for new ones.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from hubhost.functions import LEVELS

__all__ = ["ConsoleLogins", "Session", "COOKIE", "TOKEN_TTL", "SESSION_TTL"]

COOKIE = "hubhost_console"
TOKEN_TTL = 300.0            # seconds a printed login URL stays good (if unused)
SESSION_TTL = 8 * 3600.0     # seconds a console session lasts from its login
MAX_TOKENS = 16              # unused login tokens kept; older ones are dropped
MAX_SESSIONS = 64            # open sessions kept; the oldest is logged out first


@dataclass
class Session:
    level: str
    expires: float           # time.monotonic() deadline
    created: float           # time.time(), for display


def _key(secret: str) -> str:
    """Tables hold digests, never the secrets themselves (a heap dump leaks no live cookie)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class ConsoleLogins:
    """The one-time login tokens and the open sessions of one hub."""

    def __init__(self, token_ttl: float = TOKEN_TTL, session_ttl: float = SESSION_TTL) -> None:
        self.token_ttl = token_ttl
        self.session_ttl = session_ttl
        self._tokens: OrderedDict[str, tuple[str, float]] = OrderedDict()   # digest -> (level, deadline)
        self._sessions: OrderedDict[str, Session] = OrderedDict()           # digest -> session

    def mint(self, level: str) -> tuple[str, float]:
        """A new one-time login token of `level`; returns (token, seconds it stays good)."""
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r} (none, support, administrator)")
        self._expire()
        token = secrets.token_urlsafe(32)
        self._tokens[_key(token)] = (level, time.monotonic() + self.token_ttl)
        while len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)
        return token, self.token_ttl

    def redeem(self, token: str) -> tuple[str, Session] | None:
        """Trade a login token for a new session: (cookie value, session), or None when the
        token is unknown, used already or expired. A token works once."""
        self._expire()
        found = self._tokens.pop(_key(token), None)
        if found is None:
            return None
        level, _ = found
        sid = secrets.token_urlsafe(32)
        session = Session(level, time.monotonic() + self.session_ttl, time.time())
        self._sessions[_key(sid)] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return sid, session

    def session(self, cookie: str | None) -> Session | None:
        """The live session a cookie names, or None."""
        if not cookie:
            return None
        k = _key(cookie)
        s = self._sessions.get(k)
        if s is None:
            return None
        if s.expires <= time.monotonic():
            del self._sessions[k]
            return None
        return s

    def logout(self, cookie: str | None) -> bool:
        return bool(cookie) and self._sessions.pop(_key(cookie), None) is not None  # type: ignore[arg-type]

    def clear(self) -> None:
        """Forget every token and session (`hubhost console --close`)."""
        self._tokens.clear()
        self._sessions.clear()

    def counts(self) -> dict[str, int]:
        self._expire()
        return {"sessions": len(self._sessions), "tokens": len(self._tokens)}

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, (_, t) in self._tokens.items() if t <= now]:
            del self._tokens[k]
        for k in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[k]
