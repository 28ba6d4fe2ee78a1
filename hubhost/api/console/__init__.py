"""The hub console: server-rendered pages (Jinja2, templates/) over the API's own data, a
small script (static/console.js) for live updates over the API's WebSocket, and logins by
one-time token and session cookie (sessions.py). Served on the API's TCP listener, which
`hubhost console` opens on demand (loopback) when [api] tcp is not configured.

Nothing here costs anything until someone logs in: no listener, no store listener, and
Jinja2 is imported at the first page.
"""

from hubhost.api.console.pages import Console

__all__ = ["Console"]
