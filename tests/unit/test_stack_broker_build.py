"""The broker build's cache key: a prefix is reused only for the same source, flags and patches."""

from __future__ import annotations

import shutil
from pathlib import Path

from cityops.stack import broker_build
from cityops.stack.layout import repo_root


def _deploy_copy(tmp_path: Path) -> Path:
    deploy = tmp_path / "deploy"
    shutil.copytree(
        repo_root() / "deploy" / "mosquitto" / "patches", deploy / "mosquitto" / "patches"
    )
    return deploy


def _fake_build(prefix: Path, deploy: Path) -> None:
    (prefix / "sbin").mkdir(parents=True)
    (prefix / "sbin" / "mosquitto").write_text("#!/bin/sh\n")
    (prefix / "BUILD").write_text(broker_build.build_id(deploy))


def test_a_finished_build_of_the_same_recipe_is_reused(tmp_path: Path) -> None:
    deploy = _deploy_copy(tmp_path)
    prefix = tmp_path / "opt" / "mosquitto-2.0.21"
    assert not broker_build.build_current(deploy, prefix)
    _fake_build(prefix, deploy)
    assert broker_build.build_current(deploy, prefix)
    # ensure_broker returns at once for a current build: nothing is fetched or compiled
    assert broker_build.ensure_broker(deploy, prefix) is False


def test_a_changed_patch_or_a_missing_binary_means_rebuild(tmp_path: Path) -> None:
    deploy = _deploy_copy(tmp_path)
    prefix = tmp_path / "opt" / "mosquitto-2.0.21"
    _fake_build(prefix, deploy)
    patch = next((deploy / "mosquitto" / "patches").glob("*.patch"))
    patch.write_text(patch.read_text() + "\n")
    assert not broker_build.build_current(deploy, prefix)
    (prefix / "BUILD").write_text(broker_build.build_id(deploy))  # rebuilt with the new patch
    assert broker_build.build_current(deploy, prefix)
    (prefix / "sbin" / "mosquitto").unlink()
    assert not broker_build.build_current(deploy, prefix)


def test_the_recipe_names_the_debian_source_and_the_keyring() -> None:
    assert broker_build.DEBIAN_VERSION == "2.0.21-1"
    assert Path("/opt/cityops/mosquitto-2.0.21") == broker_build.PREFIX
    assert "Types: deb-src" in broker_build.SOURCES
    assert "Suites: trixie" in broker_build.SOURCES
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in broker_build.SOURCES
    assert "WITH_WEBSOCKETS=no" in broker_build.MAKE_FLAGS
    assert broker_build.build_id(repo_root() / "deploy").startswith("mosquitto 2.0.21-1 patches ")
