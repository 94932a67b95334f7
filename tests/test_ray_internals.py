"""Ray internals: every one advtrain touches is listed in workflows/ray_internals.py, and each is
still where the installed Ray keeps it. A Ray upgrade that moves one fails here, by name."""

import re
from pathlib import Path

from workflows import ray_internals

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = re.compile(r"\bray\.(_private|_raylet|autoscaler\._private|core\.generated)\b")


def test_every_ray_internal_advtrain_touches_is_in_the_installed_ray():
    import ray

    missing = ray_internals.missing()
    assert not missing, f"Ray {ray.__version__} moved what advtrain relies on:\n" + "\n".join(
        missing
    )


def test_a_moved_internal_is_named_with_its_reason(monkeypatch):
    monkeypatch.setattr(
        ray_internals,
        "SURFACE",
        (
            ("ray._private.state", "state.no_such_method", "why it is needed"),
            ("ray._no_such_module", "x", "another reason"),
        ),
    )
    missing = ray_internals.missing()
    assert len(missing) == 2
    assert missing[0].startswith("ray._private.state:state.no_such_method (why it is needed): ")
    assert "AttributeError" in missing[0]
    assert missing[1].startswith("ray._no_such_module:x (another reason): ModuleNotFoundError")


def test_no_other_module_reaches_into_ray_internals():
    own = ROOT / "workflows" / "ray_internals.py"
    here = Path(__file__).resolve()
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for folder in ("advtrain", "workflows", "benchmarks", "tests")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path not in (own, here)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert not offenders, "Ray internals outside workflows/ray_internals.py:\n" + "\n".join(
        offenders
    )
