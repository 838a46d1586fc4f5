"""Ray token authentication when ``matfusion search --address`` joins an existing cluster.

Recent Ray (2.60 in this project's venv) protects clusters with a shared token
(``RAY_AUTH_MODE=token``): a new local Ray (``ray.init()`` without an address, what
``matfusion search`` does by default) turns it on by itself and keeps the token in
``~/.ray/auth_token``; ``ray start --head`` turns it on when a token exists;
``ray.init(address="auto")`` sends the token when it finds one.  But a driver
given an explicit ``HOST:PORT`` never turns it on, and is then refused by a token cluster
(``AuthenticationError: InvalidAuthToken``, raised as ``ConnectionError``).

:func:`prepare_ray_auth` closes that gap before Ray is imported: for an explicit address, with
``RAY_AUTH_MODE`` unset and a token available where Ray looks for one (``$RAY_AUTH_TOKEN``,
the file ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), it sets ``RAY_AUTH_MODE=token``.
Sending a token to a cluster without authentication is harmless; ``RAY_AUTH_MODE=disabled``
opts out.  :func:`auth_failure` recognises the refusal and says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from . import compat

AUTH_MODE = "RAY_AUTH_MODE"
HELP = (
    "the Ray cluster requires its authentication token: copy the head node's ~/.ray/auth_token to "
    "this machine (or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) and set RAY_AUTH_MODE=token; "
    "on the head, `ray get-auth-token` prints it (see docs/cluster.md)"
)


def token_source() -> Optional[str]:
    """Where Ray would read the cluster token from, or None if there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "$RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return path if Path(path).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def explicit_address(address: Optional[str]) -> bool:
    return bool(address) and address not in ("auto", "local")


def prepare_ray_auth(address: Optional[str]) -> Optional[str]:
    """Turn on token authentication for a driver joining ``address`` when a token is at hand
    and the user did not choose a mode; returns the token's source when it did."""
    if not explicit_address(address) or os.environ.get(AUTH_MODE) is not None:
        return None
    source = token_source()
    if source is None:
        return None
    os.environ[AUTH_MODE] = "token"
    compat.refresh_ray_config()  # Ray caches its config; refresh it like `ray.init` does
    return source


def auth_failure(err: BaseException) -> bool:
    """True if ``err`` (or what caused it) is Ray refusing a missing or wrong token."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
