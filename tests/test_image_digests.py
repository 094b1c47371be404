"""Third-party images are pinned by digest: the Dockerfile's FROM, compose services and k8s containers.

Runs the offline deploy validator (scripts/validate_deploy.py) on copies with one reference moved back
to a bare tag, and asserts it names that reference; the real files pass in test_deploy_validation.py.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas"
sys.path.insert(0, str(ROOT / "scripts"))

from deploy_common import unpinned_image  # noqa: E402

DIGEST = "@sha256:" + "0" * 64


def test_unpinned_image_rule() -> None:
    assert unpinned_image("redis:7.2-alpine" + DIGEST) is None
    assert unpinned_image("registry.example/team/redis" + DIGEST) is None
    assert unpinned_image("engram") is None and unpinned_image("engram:0.1.0") is None  # built here
    for ref in ("redis:7.2-alpine", "redis", "redis@sha256:abc", "redis:7.2" + DIGEST + "x", "engramx:1"):
        problem = unpinned_image(ref)
        assert problem is not None and ref in problem and "not pinned by digest" in problem, ref


def test_every_third_party_reference_in_the_tree_is_pinned() -> None:
    """The same rule over the raw text of every deploy file: nothing hides behind a file the checks skip."""
    refs = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), flags=re.M)
    for path in [ROOT / "docker-compose.yml", *sorted((ROOT / "k8s").rglob("*.yaml"))]:
        refs += re.findall(r"^\s*(?:-\s+)?image:\s*[\"']?([^\s\"']+)", path.read_text(), flags=re.M)
    assert len(refs) >= 5, refs  # python, redis (compose, k8s), jaeger (compose, k8s), engram ...
    assert [r for r in refs if unpinned_image(r)] == []


def _validate(root: Path, part: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    import validate_deploy

    rc = validate_deploy.main(["--root", str(root), "--schemas", str(SCHEMAS), "--only", part])
    return rc, capsys.readouterr().out


def _copy_with(tmp_path: Path, rel: str, *, old: str, new: str) -> Path:
    root = tmp_path / "deploy"
    root.mkdir()
    for name in ("docker-compose.yml", "Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "k8s", root / "k8s")
    shutil.rmtree(root / "k8s" / "overlays")  # base only: the same checks, one render
    text = (root / rel).read_text()
    assert old in text, f"test fixture out of date: {old!r} not in {rel}"
    (root / rel).write_text(text.replace(old, new, 1))
    return root


@pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"{SCHEMAS} is absent (the validator's schemas; CI has it)")
@pytest.mark.parametrize(
    ("part", "rel", "pattern", "expected"),
    [
        (
            "dockerfile",
            "Dockerfile",
            r"FROM python:3\.11-slim@sha256:[0-9a-f]{64}",
            "FAIL Dockerfile: FROM image python",
        ),
        ("compose", "docker-compose.yml", r"image: redis:[^@\s]+@sha256:[0-9a-f]{64}", "services.redis: image redis"),
        ("k8s", "k8s/base/redis.yaml", r"image: redis:[^@\s]+@sha256:[0-9a-f]{64}", "container redis: image redis"),
    ],
)
def test_a_tag_without_digest_is_named(
    part: str, rel: str, pattern: str, *, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = re.search(pattern, (ROOT / rel).read_text())
    assert old is not None, f"test fixture out of date: no {pattern!r} in {rel}"
    root = _copy_with(tmp_path, rel, old=old.group(0), new=old.group(0).split("@")[0])
    rc, out = _validate(root, part, capsys)
    assert rc == 1, out
    assert expected in out and "not pinned by digest" in out, out
