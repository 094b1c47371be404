"""The lock files hold what pyproject.toml asks for, with hashes, and never torch.

requirements.lock (runtime: the Dockerfile) and requirements-dev.lock (runtime + dev: setup.sh, CI)
are written by scripts/lock.sh; this catches a dependency added to pyproject.toml without
re-locking, a pin outside its range, a runtime pin that differs between the two files, and a CUDA
torch slipping in.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def _pins(path: Path) -> dict[str, tuple[str, Marker | None, int]]:
    """package -> (version, marker, number of hashes), parsed from a pip-style lock file."""
    out: dict[str, tuple[str, Marker | None, int]] = {}
    current, name = "", path.name
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            assert current not in out, f"{name}: {current} pinned twice"
            out[current] = (m.group(2), Marker(m.group(3)) if m.group(3) else None, 0)
        elif line.strip().startswith("--hash=sha256:"):
            version, marker, hashes = out[current]
            assert re.fullmatch(r"--hash=sha256:[0-9a-f]{64}( \\)?", line.strip()), line
            out[current] = (version, marker, hashes + 1)
        elif line.strip() and not line.lstrip().startswith("#"):
            raise AssertionError(f"{name}: unexpected line {line!r}")
    return out


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _check(reqs: list[str], pins: dict[str, tuple[str, Marker | None, int]], lock: str) -> None:
    for text in reqs:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock}: {req.name} (pyproject.toml) is not locked: run scripts/lock.sh"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), f"{lock}: {name}=={version} outside {req}"


def test_every_dependency_is_locked_within_its_range_with_hashes() -> None:
    runtime, dev = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-dev.lock")
    assert len(runtime) > 50 and len(dev) > len(runtime)
    _check(_project()["dependencies"], runtime, "requirements.lock")
    _check(_project()["dependencies"] + _project()["optional-dependencies"]["dev"], dev, "requirements-dev.lock")
    for lock, pins in (("requirements.lock", runtime), ("requirements-dev.lock", dev)):
        assert all(hashes > 0 for _, _, hashes in pins.values()), f"{lock}: a pin without hashes"
        assert not any(n == "torch" or n.startswith(("nvidia-", "triton")) for n in pins), f"{lock}: torch/CUDA"


def test_runtime_pins_are_the_same_in_both_locks() -> None:
    runtime, dev = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-dev.lock")
    assert {n: v for n, (v, _, _) in runtime.items()} == {n: dev[n][0] for n in runtime}


def test_the_lock_files_are_what_setup_and_the_dockerfile_install() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "--require-hashes -r requirements-dev.lock" in setup and "--no-deps -e ." in setup
    docker = (ROOT / "Dockerfile").read_text()
    assert "COPY requirements.lock ./" in docker and "--require-hashes -r requirements.lock" in docker
    assert "!requirements.lock" in (ROOT / ".dockerignore").read_text()


def test_the_lock_parser_reads_pins_and_refuses_what_it_does_not_understand(tmp_path: Path) -> None:
    good = tmp_path / "good.lock"
    good.write_text(
        "# header\nnumpy==2.0 ; python_full_version < '3.12' \\\n    --hash=sha256:" + "a" * 64 + " \\\n"
        "    --hash=sha256:" + "b" * 64 + "\n    # via x\nRedis==5.0 \\\n    --hash=sha256:" + "c" * 64 + "\n"
    )
    pins = _pins(good)
    assert (
        pins["numpy"][0] == "2.0" and pins["numpy"][2] == 2 and str(pins["numpy"][1]) == 'python_full_version < "3.12"'
    )
    assert pins["redis"] == ("5.0", None, 1)
    bad = tmp_path / "bad.lock"
    bad.write_text("numpy==2.0 \\\n    --hash=sha256:" + "a" * 64 + "\nnumpy>=1\n")
    with pytest.raises(AssertionError, match="unexpected line 'numpy>=1'"):
        _pins(bad)
