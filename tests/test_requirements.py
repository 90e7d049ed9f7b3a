"""requirements.txt (pinned, for cluster images) stays in step with pyproject.toml."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt line {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_dependency_is_pinned_within_its_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = _pins()
    for dep in deps:
        req = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} (pyproject.toml) is not pinned in requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


def test_the_tpu_extra_pins_the_jax_of_requirements():
    """libtpu is built for one jaxlib: the tpu extra (and the test extra, which installs it for
    tests/test_tpu_plan.py) must name requirements.txt's jax."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("tpu", "test"):
        tpu = [Requirement(d) for d in extras[extra] if Requirement(d).name == "jax"]
        assert [(r.extras, str(r.specifier)) for r in tpu] == [({"tpu"}, f"=={_pins()['jax']}")], extra
