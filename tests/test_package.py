"""Distro packaging: the Debian package installs and runs in a clean Debian 13
root (scripts/package-test), the RPM builds (scripts/build-rpm), and the
packaging files agree with the code (version, dependencies, units).

The root-only tests run in CI (as root) and are never skipped there: they
skip only when not run as root and HARBOR_REQUIRE_PACKAGE is unset.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

import harbord

ROOT = Path(__file__).resolve().parent.parent
DEBIAN = ROOT / "packaging" / "debian"
SPEC = ROOT / "packaging" / "rpm" / "harbord.spec"

pytestmark = pytest.mark.package


def _require_root(what: str) -> None:
    if os.geteuid() != 0 and not os.environ.get("HARBOR_REQUIRE_PACKAGE"):
        pytest.skip(f"{what} needs root (set HARBOR_REQUIRE_PACKAGE=1 to make this a failure)")


def _summary(output: str) -> str:
    marker = "== package-test summary =="
    return output[output.index(marker) :] if marker in output else output[-6000:]


def test_debian_package_installs_runs_and_purges_in_a_clean_trixie_root(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _require_root("building a Debian 13 root with debootstrap")
    started = time.monotonic()
    result = subprocess.run(
        [str(ROOT / "scripts" / "package-test")],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    output = result.stdout + result.stderr
    with capsys.disabled():  # the checks and timings, in CI's log too
        print(f"\n{_summary(output)}\n(package-test: {time.monotonic() - started:.0f}s)")
    assert result.returncode == 0, f"scripts/package-test failed:\n{output[-12000:]}"
    assert "package-test: PASS" in output


def test_rpm_builds_with_the_same_files() -> None:
    if shutil.which("rpmbuild") is None:
        _require_root("installing rpm")
        pytest.fail("rpmbuild is missing (Debian: apt-get install rpm)")
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-rpm"), str(ROOT / "build" / "rpm")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "file list checked" in result.stdout


# -- the packaging files agree with the code (no root needed) ---------------------


def _dependencies() -> dict[str, str | None]:
    """pyproject's runtime dependencies: normalized name -> lower bound (or None)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps: dict[str, str | None] = {}
    for spec in project["dependencies"]:
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*(?:\[.*?\])?\s*(?:>=\s*([\w.]+))?", spec)
        assert match, spec
        deps[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return deps


def _control_depends() -> dict[str, str | None]:
    control = (DEBIAN / "control").read_text()
    package = control[control.index("\nPackage: harbord") :]
    depends = re.search(r"^Depends:(.*?)(?=^\S)", package, re.MULTILINE | re.DOTALL)
    assert depends
    found: dict[str, str | None] = {}
    for item in depends.group(1).split(","):
        match = re.match(r"\s*([a-z0-9.+-]+)\s*(?:\(>=\s*([\w.~+-]+)\))?", item)
        if match and match.group(1).startswith("python3-"):
            found[match.group(1).removeprefix("python3-")] = match.group(2)
    return found


def test_debian_depends_on_every_runtime_dependency_with_its_lower_bound() -> None:
    depends = _control_depends()
    for name, lower in _dependencies().items():
        assert name in depends, f"packaging/debian/control lacks python3-{name} in Depends"
        if lower:
            assert depends[name] == lower, (
                f"python3-{name}: control says >= {depends[name]}, pyproject >= {lower}"
            )


def test_rpm_requires_every_runtime_dependency_with_its_lower_bound() -> None:
    requires = dict(
        re.findall(
            r"^Requires:\s*python3dist\(([\w.-]+)\)(?:\s*>=\s*([\w.]+))?",
            SPEC.read_text(),
            re.MULTILINE,
        )
    )
    for name, lower in _dependencies().items():
        assert name in requires, f"packaging/rpm/harbord.spec lacks Requires: python3dist({name})"
        if lower:
            assert requires[name] == lower, (
                f"{name}: spec says >= {requires[name]}, pyproject >= {lower}"
            )


def test_package_versions_match_the_code() -> None:
    changelog = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert re.match(rf"^harbord \({re.escape(harbord.__version__)}(-\d+)?\) ", changelog), (
        f"packaging/debian/changelog's first entry is not version {harbord.__version__}: "
        "add an entry (dch -v VERSION)"
    )
    spec_version = re.search(r"^Version:\s*(\S+)", SPEC.read_text(), re.MULTILINE)
    assert spec_version and spec_version.group(1) == harbord.__version__


def _units() -> list[str]:
    return sorted(
        p.name for p in (ROOT / "units").iterdir() if p.suffix in (".service", ".socket", ".timer")
    )


def test_every_unit_is_packaged() -> None:
    units = _units()
    assert "harbord.service" in units and "harbord.socket" in units
    install = (DEBIAN / "harbord.install").read_text()
    spec = SPEC.read_text()
    for unit in units:
        assert f"units/{unit} usr/lib/systemd/user/" in install, (
            f"{unit} missing from debian/harbord.install"
        )
        assert f"%{{_userunitdir}}/{unit}" in spec, f"{unit} missing from %files in the spec"
    assert "dh_installsystemduser --no-enable" in (DEBIAN / "rules").read_text()


def test_every_man_page_is_packaged() -> None:
    pages = sorted(p.name.removesuffix(".scd") for p in (ROOT / "man").glob("*.scd"))
    listed = (DEBIAN / "harbord.manpages").read_text().split()
    assert sorted(Path(p).name for p in listed) == pages
    spec = SPEC.read_text()
    for page in pages:
        section = page.rsplit(".", 1)[1]
        assert f"%{{_mandir}}/man{section}/{page}*" in spec, (
            f"{page} missing from %files in the spec"
        )
