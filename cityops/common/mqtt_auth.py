"""Mosquitto password-file credentials: `$7$` PBKDF2-SHA512 hashes and atomic file writes.

Mosquitto 2.0 (`mosquitto_passwd`) writes one `username:$7$<iterations>$<b64 salt>$<b64 hash>`
line per user: a 12-byte random salt and PBKDF2-HMAC-SHA512 with a 64-byte key, 101 iterations
by default. Writing these lines from Python lets us provision 100k devices in seconds, where the
dynamic-security plugin managed ~46 devices/s (ARCHITECTURE.md Part B).

The broker's auth plugin (deploy/mosquitto/plugin/) reads `service.passwd` (service accounts,
written by the stack) and `devices.passwd` (written by the API under `password_files_lock`
with `write_file_atomic`) and notices a change by itself within 0.2 s: no signal, no reload.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

SALT_BYTES = 12
DEFAULT_ITERATIONS = 101
HASH_BYTES = 64
_PREFIX = "$7$"


class PasswordFileError(ValueError):
    """A password-file line or username that Mosquitto would not accept."""


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> str:
    """Return Mosquitto's `$7$<iterations>$<b64 salt>$<b64 sha512 pbkdf2>` hash of `password`."""
    if iterations < 1:
        raise PasswordFileError("iterations must be at least 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    salt_b64 = base64.b64encode(salt).decode()
    hash_b64 = base64.b64encode(derived).decode()
    return f"{_PREFIX}{iterations}${salt_b64}${hash_b64}"


def verify_password(password: str, hashed: str) -> bool:
    """Return whether `password` matches a `$7$` hash (constant-time comparison)."""
    parts = hashed.split("$")
    # "$7$101$salt$hash".split("$") == ["", "7", "101", "salt", "hash"]
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
    except ValueError:
        return False
    expected = hash_password(password, salt=salt, iterations=int(parts[2]))
    return hmac.compare_digest(expected, hashed)


def _check_username(username: str) -> None:
    if not username or ":" in username or any(c in username for c in "\r\n"):
        raise PasswordFileError(f"invalid MQTT username {username!r}")


def password_line(username: str, password: str) -> str:
    """Return one `username:$7$...` line (no newline) for a clear-text password."""
    _check_username(username)
    return f"{username}:{hash_password(password)}"


def render_password_file(entries: Iterable[tuple[str, str]]) -> str:
    """Render `(username, hashed password)` pairs as a Mosquitto password file."""
    lines = []
    for username, hashed in entries:
        _check_username(username)
        if not hashed.startswith(_PREFIX):
            raise PasswordFileError(f"hash for {username!r} is not a $7$ hash")
        lines.append(f"{username}:{hashed}\n")
    return "".join(lines)


def parse_password_file(text: str) -> dict[str, str]:
    """Parse a password file into username -> hash (blank lines and `#` comments skipped)."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, hashed = line.partition(":")
        if not sep or not username:
            raise PasswordFileError(f"line {number}: expected username:hash")
        entries[username] = hashed
    return entries


def write_file_atomic(path: Path, text: str, *, mode: int = 0o640) -> None:
    """Replace `path` with `text` atomically: temp file in the same dir, fsync, os.replace.

    The file gets `mode` (0640: the broker drops privileges to user `mosquitto` and reads it
    through its group; the stack makes the folder setgid `mosquitto` so new files inherit it).
    """
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        tmp_path.replace(path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def password_files_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` while several writers edit the password files."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
