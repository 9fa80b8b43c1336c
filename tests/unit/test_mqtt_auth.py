"""Mosquitto `$7$` password hashes, password files and atomic writes."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from cityops.common import mqtt_auth

# Frozen from Mosquitto 2.0.11: `mosquitto_passwd -b pw.txt wb-0042 's3cret-Pässword'`.
VECTOR_USER = "wb-0042"
VECTOR_PASSWORD = "s3cret-Pässword"
VECTOR_SALT_B64 = "5+SicVtZhAcdAL2S"
VECTOR_HASH = (
    "$7$101$5+SicVtZhAcdAL2S$5BakIlC6lzqwd5Ns60yzy2vlIVRsYnMO1KMprrt4hI8BSf+9XIL+Uj3FNi8hO5h"
    "OrnpGpS3ro/EALsIbvITE8w=="
)


def test_hash_matches_mosquitto_passwd_vector() -> None:
    salt = base64.b64decode(VECTOR_SALT_B64)
    assert mqtt_auth.hash_password(VECTOR_PASSWORD, salt=salt, iterations=101) == VECTOR_HASH


def test_hash_format_is_7_iterations_salt_hash() -> None:
    hashed = mqtt_auth.hash_password("pw")
    empty, algorithm, iterations, salt_b64, hash_b64 = hashed.split("$")
    assert (empty, algorithm, iterations) == ("", "7", "101")
    assert len(base64.b64decode(salt_b64)) == mqtt_auth.SALT_BYTES == 12
    assert len(base64.b64decode(hash_b64)) == 64  # sha512


def test_salt_is_random_per_hash() -> None:
    assert mqtt_auth.hash_password("pw") != mqtt_auth.hash_password("pw")


def test_iterations_are_encoded() -> None:
    hashed = mqtt_auth.hash_password("pw", salt=b"\0" * 12, iterations=1000)
    assert hashed.startswith("$7$1000$AAAAAAAAAAAAAAAA$")
    assert mqtt_auth.verify_password("pw", hashed)
    with pytest.raises(mqtt_auth.PasswordFileError):
        mqtt_auth.hash_password("pw", iterations=0)


def test_verify_password() -> None:
    assert mqtt_auth.verify_password(VECTOR_PASSWORD, VECTOR_HASH)
    assert not mqtt_auth.verify_password("wrong", VECTOR_HASH)
    assert not mqtt_auth.verify_password(VECTOR_PASSWORD, "$6$not-pbkdf2")
    assert not mqtt_auth.verify_password(VECTOR_PASSWORD, "$7$101$!!notbase64$x")


def test_render_and_parse_round_trip() -> None:
    entries = [("ingest", mqtt_auth.hash_password("a")), (VECTOR_USER, VECTOR_HASH)]
    text = mqtt_auth.render_password_file(entries)
    assert text == f"ingest:{entries[0][1]}\n{VECTOR_USER}:{VECTOR_HASH}\n"
    assert mqtt_auth.parse_password_file("# comment\n\n" + text) == dict(entries)


@pytest.mark.parametrize("username", ["", "a:b", "a\nb"])
def test_render_refuses_bad_usernames(username: str) -> None:
    with pytest.raises(mqtt_auth.PasswordFileError):
        mqtt_auth.render_password_file([(username, VECTOR_HASH)])


def test_render_refuses_clear_text() -> None:
    with pytest.raises(mqtt_auth.PasswordFileError):
        mqtt_auth.render_password_file([("dev", "clear-text")])


def test_password_line() -> None:
    line = mqtt_auth.password_line("dev-1", "pw")
    user, _, hashed = line.partition(":")
    assert user == "dev-1"
    assert mqtt_auth.verify_password("pw", hashed)


def test_write_file_atomic_replaces_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("old\n")
    mqtt_auth.write_file_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]  # no temp file left behind


def test_write_file_atomic_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        mqtt_auth.write_file_atomic(target, "\udcff")  # lone surrogate cannot be encoded
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]
