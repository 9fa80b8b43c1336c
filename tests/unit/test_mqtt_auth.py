"""Mosquitto `$7$` password hashes, password files and atomic writes."""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
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


def test_combine_password_files_service_accounts_win(tmp_path: Path) -> None:
    service = tmp_path / "service.passwd"
    devices = tmp_path / "devices.passwd"
    out = tmp_path / "passwd"
    service_hash = mqtt_auth.hash_password("svc")
    service.write_text(f"ingest:{service_hash}\n")
    devices.write_text(f"ingest:{VECTOR_HASH}\n{VECTOR_USER}:{VECTOR_HASH}\n")
    assert mqtt_auth.combine_password_files(service_file=service, device_file=devices, out_file=out)
    assert mqtt_auth.parse_password_file(out.read_text()) == {
        "ingest": service_hash,
        VECTOR_USER: VECTOR_HASH,
    }
    # unchanged input: no rewrite, so callers know not to SIGHUP
    assert not mqtt_auth.combine_password_files(
        service_file=service, device_file=devices, out_file=out
    )


def test_combine_without_device_file(tmp_path: Path) -> None:
    service = tmp_path / "service.passwd"
    service.write_text(f"gateway:{VECTOR_HASH}\n")
    out = tmp_path / "passwd"
    mqtt_auth.combine_password_files(
        service_file=service, device_file=tmp_path / "missing", out_file=out
    )
    assert out.read_text() == service.read_text()


def test_reload_broker_without_pid_file(tmp_path: Path) -> None:
    assert not mqtt_auth.reload_broker(tmp_path / "none.pid")
    (tmp_path / "bad.pid").write_text("not a pid")
    assert not mqtt_auth.reload_broker(tmp_path / "bad.pid")


def test_reload_broker_never_signals_a_non_mosquitto_process(tmp_path: Path) -> None:
    # a stale pid file naming some other process must not get that process a SIGHUP
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pid_file = tmp_path / "mosquitto.pid"
        pid_file.write_text(f"{sleeper.pid}\n")
        assert not mqtt_auth.reload_broker(pid_file)
        assert sleeper.poll() is None
    finally:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait()
