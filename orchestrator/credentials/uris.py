"""Masking, stripping and scrubbing credentials in URIs and in text that may quote them."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

_SECRET_KEYS = re.compile(r"(pass(word)?|secret|token|key|auth|credential|signature)", re.IGNORECASE)
# libpq's and MySQL's connection keywords for a password, which a database URL's query passes on
_PASSWORD_KEYS = frozenset({"password", "passwd", "sslpassword"})
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<password>[^@\s/]*)@")


def mask_uri(uri: str | None) -> str | None:
    """``uri`` with its password and secret-looking query values replaced by ``***``."""
    if not uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(_SECRET_KEYS.search(k) for k, _ in pairs)
    if "@" not in parts.netloc and not secret_query:
        return uri  # nothing to hide (and urlunsplit would rewrite sqlite:////abs/path)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = urlencode([(k, "***" if _SECRET_KEYS.search(k) else v) for k, v in pairs], safe="*:/") if pairs else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def strip_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user:password@, user, password)``: credentials go through the environment
    (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``), never into stored state."""
    if "://" not in uri:
        return uri, None, None
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = (unquote(p) for p in userinfo.partition(":"))  # p%40ss in a URL is the password p@ss
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), user or None, password or None


def scrub(text: str) -> str:
    """Mask ``scheme://user:password@`` credentials anywhere in ``text``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def url_password(url: str) -> str | None:
    """Where a URL carries a password (``user:password@`` or a ``?password=`` query value, as
    libpq and SQLAlchemy read them), for a refusal that names it without quoting it; None if
    it carries none. A user name alone (``postgresql://user@host/db``) is no secret."""
    if "://" not in url:
        return None
    if strip_credentials(url)[2]:
        return "its user:password@ part"
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key.lower() in _PASSWORD_KEYS and value:
            return f"its {key}= query value"
    return None
