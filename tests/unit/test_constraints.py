"""constraints.txt is the lock: every package pyproject.toml names is pinned in it, at a version inside
pyproject's bounds, and both the Makefile's install and the image install through it. A dependency added
without `make lock` fails here, not in a build that quietly takes whatever release is newest."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = PIN.match(line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        named.extend(extra)
    return [Requirement(text) for text in named]


def test_every_dependency_of_pyproject_is_pinned_within_its_bounds() -> None:
    pinned = pins()
    missing = sorted({str(r) for r in requirements() if canonicalize_name(r.name) not in pinned})
    assert not missing, f"not in constraints.txt (run `make lock`): {missing}"
    outside = sorted(
        f"{r} (pinned {pinned[canonicalize_name(r.name)]})"
        for r in requirements()
        if not r.specifier.contains(pinned[canonicalize_name(r.name)], prereleases=True)
    )
    assert not outside, f"constraints.txt pins versions pyproject.toml excludes (run `make lock`): {outside}"


def test_the_makefile_and_the_image_install_through_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt -e \"\.\[dev\]\"", makefile)
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert "COPY pyproject.toml constraints.txt" in dockerfile
    installs = [line for line in dockerfile.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
