"""Packaging: the wheels from ``scripts/build_wheels.sh`` install the way a user installs them.

Each case is a fresh venv that runs exactly ``pip install --find-links WHEELS rllm-core <dists>``,
dependencies from the package index (this machine's pip config), then the venv's own
``rllm plugins --json``, an import of every module the installed distributions ship, and ``pip check``.
The backends (verl, tinker, torch) get the CPU torch first (``torch==2.13.0``, as ``scripts/setup.sh``
does and as a user on this image must: unpinned, pip picks a multi-GB CUDA build from the index), and
the install must leave that torch in place: a dependency range that excludes it would swap in a CUDA
build. rllm-core alone, rllm-core with its dependencies at their declared floors, and every other
distribution (none needs torch) install on Python 3.10, the lowest ``requires-python`` allows.
The cases run concurrently, once per module; each venv is removed when its case ends.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.version import Version

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"
CPU_TORCH = "2.13.0+cpu"
# This image's CPU torch wheel (pip's find-links) is cp311; elsewhere the pin means a CUDA download.
TORCH_PYTHON = "3.11"
LOWEST_PYTHON = "3.10"  # rllm-core's requires-python floor; the rest of the suite runs on 3.11


@dataclass(frozen=True)
class Case:
    """One user install: ``pip install --find-links WHEELS rllm-core *dists`` into a fresh venv."""

    id: str
    dists: tuple[str, ...]
    python: str
    torch_first: bool
    backend: str | None = None
    """A backend name that ``rllm plugins`` must list, registered by ``backend_dist``."""
    backend_dist: str | None = None
    needs_extra: frozenset[str] = frozenset()
    """Modules that need an extra of their distribution (``pip install 'dist[test]'``): not imported."""
    floors: bool = False
    """Pin rllm-core's runtime dependencies to their declared lower bounds on the same command line."""


CASES = [
    Case("verl", ("rllm-verl",), TORCH_PYTHON, True, "verl", "rllm-verl"),
    Case("tinker", ("rllm-tinker",), TORCH_PYTHON, True, "tinker", "rllm-tinker", frozenset({"rllm_tinker.testing"})),
    Case("torch", ("rllm-torch",), TORCH_PYTHON, True, "torch", "rllm-torch"),
    Case("core", (), LOWEST_PYTHON, False),
    Case("core-floors", (), LOWEST_PYTHON, False, floors=True),
    # Every other distribution: none of them needs torch.
    Case(
        "without-torch",
        (
            "rllm-rewards",
            "rllm-gateway",
            "rllm-wandb",
            "rllm-mlflow",
            "rllm-example-backend",
            "rllm-example-arith",
            "rllm-example-opsd",
            "rllm-example-calculator",
        ),
        LOWEST_PYTHON,
        False,
        "example",
        "rllm-example-backend",
    ),
]
BACKENDS = [c for c in CASES if c.torch_first]

# Run in each venv after the install: what is installed, where from, and which modules fail to import.
PROBE = r"""
import importlib, importlib.metadata as md, json, sys
dists, skip = sys.argv[1].split(","), set(sys.argv[2].split(",")) - {""}
out = {"metadata": {}, "import_errors": {}, "versions": {}}
for d in md.distributions():
    out["versions"][d.metadata["Name"].lower().replace("_", "-")] = d.version
out["torch"] = out["versions"].get("torch")
for name in dists:
    dist = md.distribution(name)
    out["metadata"][name] = dist.read_text("METADATA")
    for f in dist.files:
        parts = f.parts
        if f.suffix != ".py" or parts[0].endswith((".dist-info", ".data")) or parts[0] == "..":
            continue
        module = ".".join(parts[:-1] + (() if f.stem == "__init__" else (f.stem,)))
        if module in skip:
            continue
        try:
            importlib.import_module(module)
        except BaseException as exc:
            out["import_errors"][module] = f"{type(exc).__name__}: {exc}"
print("PROBE " + json.dumps(out))
"""


@dataclass
class Install:
    """What one case's venv gave: each command's output, the plugin rows, the probe's findings."""

    case: Case
    venv: Path
    seconds: float = 0.0
    steps: list[float] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    failed: str | None = None
    plugins: list[dict] = field(default_factory=list)
    probe: dict = field(default_factory=dict)
    pip_check: str | None = None

    def require_ok(self) -> None:
        if self.failed:
            pytest.fail(f"{self.case.id}: {self.failed}\n" + "\n".join(self.log[-2:]), pytrace=False)


def find_python(version: str) -> str | None:
    """An interpreter for ``version`` (``3.10``): this one, one on PATH, or a pyenv install."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(map(str, pyenv.glob(f"versions/{version}.*/bin/python{version}")))
    for exe in filter(None, candidates):  # pyenv's shims exist but fail for versions not selected
        probe = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(map(int, version.split(".")))):
            return exe
    return None


def user_env(venv: Path) -> dict[str, str]:
    """The environment of a user with this venv activated: none of the test run's paths or plugin lists."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLLM_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    # pip's byte-compilation only pre-builds caches (the probe imports every shipped module anyway);
    # skipping it saves about a third of each install's time.
    env["PIP_NO_COMPILE"] = "1"
    return env


def floor_pins(core_wheel: Path) -> dict[str, str]:
    """rllm-core's runtime dependencies at their lower bounds (``pydantic>=2.11`` -> ``pydantic: 2.11``)."""
    pins = {}
    for req in re.findall(r"^Requires-Dist: (.+)$", wheel_metadata(core_wheel), re.M):
        if ";" in req:  # an extra's or a platform's requirement
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,\s]+)", req.strip())
        assert m, f"rllm-core requires {req!r}: expected a plain lower bound"
        pins[m.group(1).lower()] = m.group(2)
    return pins


def run_case(case: Case, wheels: dict[str, Path], workdir: Path) -> Install:
    """Create the venv, install and probe; stop at the first command that fails, recording its output."""
    venv = workdir / case.id
    folder = wheels["rllm-core"].parent
    pins = [f"{k}=={v}" for k, v in floor_pins(wheels["rllm-core"]).items()] if case.floors else []
    inst = Install(case, venv)
    start = time.monotonic()
    python = find_python(case.python)
    if python is None:
        inst.failed = f"no Python {case.python} on this machine"
        return inst
    pip = str(venv / "bin" / "pip")
    env = user_env(venv)

    def step(cmd: list[str], timeout: float) -> str | None:
        t0 = time.monotonic()
        try:
            res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            inst.failed = f"timed out after {timeout:.0f}s: {' '.join(cmd)}"
            return None
        inst.steps.append(time.monotonic() - t0)
        inst.log.append(f"$ {' '.join(cmd)}  (rc {res.returncode})\n{(res.stdout + res.stderr)[-4000:]}")
        if res.returncode != 0:
            inst.failed = f"exit {res.returncode}: {' '.join(cmd)}"
            return None
        return res.stdout

    try:
        if step([python, "-m", "venv", str(venv)], 300) is None:
            return inst
        if case.torch_first and step([pip, "install", TORCH_PIN], 900) is None:
            return inst
        # The user's command, verbatim (dependencies from the index); the floors case adds its pins.
        if step([pip, "install", "--find-links", str(folder), "rllm-core", *case.dists, *pins], 1200) is None:
            return inst
        if (out := step([str(venv / "bin" / "rllm"), "plugins", "--json"], 300)) is None:
            return inst
        inst.plugins = json.loads(out)
        probe_args = [",".join(("rllm-core", *case.dists)), ",".join(case.needs_extra)]
        if (out := step([str(venv / "bin" / "python"), "-c", PROBE, *probe_args], 600)) is None:
            return inst
        inst.probe = json.loads(out.rsplit("PROBE ", 1)[1])
        check = subprocess.run([pip, "check"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
        inst.pip_check = "" if check.returncode == 0 else check.stdout + check.stderr
    finally:
        inst.seconds = time.monotonic() - start
        shutil.rmtree(venv, ignore_errors=True)  # while the other cases still install
    return inst


def repo_distributions() -> dict[str, Path]:
    """Every distribution the repo holds, the way scripts/build_wheels.sh finds them: name -> folder."""
    dirs = [ROOT, *sorted(ROOT.glob("plugins/*/")), *sorted(ROOT.glob("examples/*/")), ROOT / "rllm_tinker"]
    dirs.append(ROOT / "rllm_verl")
    out = {}
    for d in dirs:
        if (d / "pyproject.toml").is_file():
            m = re.search(r'^\[project\]\s*\nname = "([^"]+)"', (d / "pyproject.toml").read_text(), re.M)
            assert m, f"{d / 'pyproject.toml'}: no [project] name"
            out[m.group(1)] = d
    return out


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="rllm-packaging-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def wheels(workdir) -> dict[str, Path]:
    """Distribution name -> wheel, built by the script (with this test run's venv as the builder)."""
    out = workdir / "wheels"
    env = {**os.environ, "RLLM_VENV": sys.prefix}
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_wheels.sh"), str(out)], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    by_name = {}
    for whl in out.glob("*.whl"):
        name = re.search(r"^Name: (.+)$", wheel_metadata(whl), re.M).group(1).strip()
        by_name[name] = whl
    return by_name


@pytest.fixture(scope="module")
def installs(wheels, workdir) -> dict[str, Install]:
    """Every case installed into its own venv, all at once (pip's downloads and unpacking overlap)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        done = {inst.case.id: inst for inst in pool.map(lambda c: run_case(c, wheels, workdir), CASES)}
    for inst in done.values():  # shown with -s, or beside a failure
        steps = " + ".join(f"{t:.0f}" for t in inst.steps)
        print(f"{inst.case.id}: {inst.seconds:.0f}s (venv, [torch,] install, plugins, probe: {steps})", file=sys.stderr)
    return done


def test_build_wheels_builds_one_wheel_per_distribution(wheels):
    assert sorted(wheels) == sorted(repo_distributions())


def test_every_distribution_is_installed_by_some_case():
    installed = {"rllm-core"}.union(*(c.dists for c in CASES))
    assert sorted(installed) == sorted(repo_distributions())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rllm_plugins_lists_every_installed_plugin_without_errors(installs, case):
    inst = installs[case.id]
    inst.require_ok()
    listed = {row["distribution"] for row in inst.plugins if not row["builtin"]}
    assert set(case.dists) <= listed, inst.plugins
    assert {row["name"]: row["errors"] for row in inst.plugins if row["errors"]} == {}


@pytest.mark.parametrize("case", [c for c in CASES if c.backend], ids=lambda c: c.id)
def test_installed_backend_is_registered_by_its_distribution(installs, case):
    inst = installs[case.id]
    inst.require_ok()
    providers = {r["distribution"] for r in inst.plugins if case.backend in r["registers"].get("backend", [])}
    assert providers == {case.backend_dist}, inst.plugins


@pytest.mark.parametrize("case", [c for c in CASES if not c.dists], ids=lambda c: c.id)
def test_rllm_core_alone_lists_only_the_builtin_plugins(installs, case):
    inst = installs[case.id]
    inst.require_ok()
    assert inst.plugins and all(row["builtin"] for row in inst.plugins), inst.plugins


def test_rllm_core_installs_with_every_dependency_at_its_floor(installs, wheels):
    inst = installs["core-floors"]
    inst.require_ok()
    floors = {name: Version(v) for name, v in floor_pins(wheels["rllm-core"]).items()}
    installed = {name: Version(inst.probe["versions"].get(name, "0")) for name in floors}
    assert installed == floors


@pytest.mark.parametrize("case", [c for c in CASES if not c.torch_first], ids=lambda c: c.id)
def test_torch_free_install_brings_no_torch(installs, case):
    inst = installs[case.id]
    inst.require_ok()
    assert inst.probe["torch"] is None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_shipped_module_imports_with_the_declared_dependencies(installs, case):
    inst = installs[case.id]
    inst.require_ok()
    assert inst.probe["import_errors"] == {}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pip_check_finds_no_broken_requirement(installs, case):
    inst = installs[case.id]
    inst.require_ok()
    assert inst.pip_check == ""


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_repo_distributions_come_from_the_wheel_folder(installs, wheels, case):
    inst = installs[case.id]
    inst.require_ok()
    for name in ("rllm-core", *case.dists):
        assert inst.probe["metadata"][name] == wheel_metadata(wheels[name]), name


@pytest.mark.parametrize("case", BACKENDS, ids=lambda c: c.id)
def test_backend_install_keeps_the_cpu_torch(installs, case):
    inst = installs[case.id]
    inst.require_ok()
    assert inst.probe["torch"] == CPU_TORCH
