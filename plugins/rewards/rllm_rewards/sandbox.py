"""Run untrusted Python in a child process with limits; never block the event loop.

What contains the child (each layer is probed once; ``SandboxResult.layers`` says which were used):

* **time**: a wall-clock limit (the whole process group, and the cgroup/PID namespace when
  present, is SIGKILLed at the deadline), a per-test alarm inside the child, and RLIMIT_CPU.
* **memory**: RLIMIT_AS per process (an allocation beyond it raises MemoryError in the child).
* **processes**: a fresh cgroup with ``pids.max`` when the pids controller is writable (root in
  most containers), else RLIMIT_NPROC (enforced for non-root users only), else a prelude that
  replaces ``os.fork``/``subprocess``/``os.system`` with functions that raise. The child runs in
  its own session and, when ``unshare`` allows it, its own PID namespace, so killing it kills
  every descendant.
* **network**: a new network namespace (``unshare -n``: no interfaces but a down loopback) when
  available, else a prelude that makes ``socket.socket`` raise. The prelude is a speed bump, not
  a wall: code using ``_socket`` or ``ctypes`` directly gets past it.
* **files**: the child runs in a fresh temporary directory (its HOME and TMPDIR) that is deleted
  afterwards, and RLIMIT_FSIZE caps the size of any file it writes. It is NOT prevented from
  reading or writing files elsewhere that the parent's user may access (no mount namespace or
  chroot): run the trainer as an unprivileged user or in a container if that matters.
* **output**: stdout/stderr are drained continuously but only the first ``max_output_bytes`` are kept.

Grading happens inside the child, in the same interpreter as the candidate code, so this protects
the machine, not the grade: determined code can tamper with its own test harness. Results come back
as lines tagged with a random nonce the candidate is not told, which stops printing fake results.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SandboxLimits", "SandboxResult", "available_layers", "run_python_tests"]


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed run."""

    timeout: float = 10.0
    """Wall-clock seconds for the whole run (all tests)."""
    test_timeout: float = 4.0
    """Wall-clock seconds per test (an alarm inside the child)."""
    cpu_seconds: int = 10
    memory_mb: int = 512
    max_processes: int = 16
    """Processes and threads the child may have at once (cgroup pids.max or RLIMIT_NPROC)."""
    max_file_mb: int = 16
    max_output_bytes: int = 64 * 1024
    isolate_network: bool = True
    python: str = sys.executable


@dataclass
class SandboxResult:
    passed: list[bool]
    """One entry per test; a test with no report (crash, kill) counts as failed."""
    details: list[str]
    """Per-test failure reason ('' when passed)."""
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    load_error: str | None = None
    layers: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0


# --- probing ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _unshare_flags() -> tuple[str, ...] | None:
    """The ``unshare`` invocation that works here (net + pid namespaces), or None."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    candidates = [
        (exe, "-n", "-p", "-f", "--kill-child"),
        (exe, "-r", "-n", "-p", "-f", "--kill-child"),
        (exe, "-n"),
        (exe, "-r", "-n"),
    ]
    for flags in candidates:
        try:
            done = subprocess.run([*flags, "/bin/true"], capture_output=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return flags
    return None


def _pids_cgroup_base() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            base = Path("/sys/fs/cgroup/pids") / path.lstrip("/")
            if (base / "cgroup.procs").exists():
                return base
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2 (unified)
        for line in lines:
            if line.startswith("0::"):
                base = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
                if "pids" in (base / "cgroup.subtree_control").read_text(errors="ignore").split():
                    return base
    return None


class _Cgroup:
    """A throwaway pids cgroup; processes in it cannot exceed ``pids.max``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, max_pids: int) -> _Cgroup | None:
        base = _cgroup_base()
        if base is None:
            return None
        path = base / f"rllm-sandbox-{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(max_pids))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return cls(path)

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def destroy(self) -> None:
        for _ in range(200):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
        with contextlib.suppress(OSError):
            self.path.rmdir()


@functools.lru_cache(maxsize=1)
def _cgroup_base() -> Path | None:
    base = _pids_cgroup_base()
    if base is None:
        return None
    probe = _Cgroup.__new__(_Cgroup)
    probe.path = base / f"rllm-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.path.mkdir()
        (probe.path / "pids.max").write_text("4")
    except OSError:
        with contextlib.suppress(OSError):
            probe.path.rmdir()
        return None
    probe.destroy()
    return base


def available_layers() -> dict[str, str]:
    """Which containment layers work on this machine (probes once; blocking)."""
    flags = _unshare_flags()
    layers = {
        "network": "namespace" if flags and "-n" in flags else "prelude",
        "pid_namespace": "yes" if flags and "-p" in flags else "no",
    }
    if _cgroup_base() is not None:
        layers["processes"] = "cgroup"
    elif os.geteuid() != 0:
        layers["processes"] = "rlimit"
    else:
        layers["processes"] = "prelude"
    return layers


# --- the child ----------------------------------------------------------------------------------

_RUNNER = r"""
import io, json, os, resource, signal, sys

def _limits(cfg):
    mb = 1 << 20
    for name, value in (("RLIMIT_AS", cfg["memory_mb"] * mb), ("RLIMIT_FSIZE", cfg["max_file_mb"] * mb),
                        ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", 256)):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
    if cfg.get("nproc"):
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
        except (ValueError, OSError):
            pass

def _deny(*args, **kwargs):
    raise PermissionError("blocked by the rllm sandbox")

def _prelude(cfg):
    if cfg["block_network"]:
        import socket
        class _NoSocket(socket.socket):
            def __init__(self, *a, **k):
                _deny()
        socket.socket = _NoSocket
        socket.create_connection = _deny
        socket.socketpair = _deny
    if cfg["block_spawn"]:
        import subprocess, _posixsubprocess
        for name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve",
                     "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl"):
            if hasattr(os, name):
                setattr(os, name, _deny)
        _posixsubprocess.fork_exec = _deny
        subprocess.Popen._execute_child = _deny

class _TestTimeout(BaseException):
    pass

def _alarm(signum, frame):
    raise _TestTimeout()

def _main():
    cfg = json.loads(sys.stdin.readline())
    sys.stdin = io.StringIO("")
    nonce, tests, mode = cfg.pop("nonce"), cfg.pop("tests"), cfg.pop("mode")
    code = cfg.pop("code")
    out = os.dup(1)
    def report(msg):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        # A leading newline: the candidate may have left a partial line on the same pipe.
        os.write(out, ("\n" + nonce + " " + json.dumps(msg) + "\n").encode())
    _limits(cfg)
    _prelude(cfg)
    signal.signal(signal.SIGALRM, _alarm)
    per_test = cfg["test_timeout"]
    try:
        compiled = compile(code, "solution.py", "exec")
    except BaseException as exc:
        report({"load_error": type(exc).__name__ + ": " + str(exc)[:300]})
        return
    if mode == "assert":
        env = {"__name__": "solution"}
        try:
            signal.setitimer(signal.ITIMER_REAL, per_test)
            exec(compiled, env)
            signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as exc:
            signal.setitimer(signal.ITIMER_REAL, 0)
            name = "timeout" if isinstance(exc, _TestTimeout) else type(exc).__name__
            report({"load_error": name + ": " + str(exc)[:300]})
            return
    for i, test in enumerate(tests):
        try:
            signal.setitimer(signal.ITIMER_REAL, per_test)
            if mode == "assert":
                exec(compile(test, "test_%d" % i, "exec"), env)
                ok, why = True, ""
            else:
                stdin = io.TextIOWrapper(io.BytesIO(test["input"].encode()))
                stdout = io.TextIOWrapper(io.BytesIO(), write_through=True)
                sys.stdin, sys.stdout = stdin, stdout
                try:
                    exec(compiled, {"__name__": "__main__"})
                except SystemExit as exc:
                    if exc.code not in (None, 0):
                        raise
                finally:
                    sys.stdin, sys.stdout = io.StringIO(""), sys.__stdout__
                got = stdout.buffer.getvalue().decode(errors="replace")
                norm = lambda s: [l.rstrip() for l in s.rstrip().splitlines()]
                ok = norm(got) == norm(test["output"])
                why = "" if ok else "wrong output: " + repr(got[:200])
            signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as exc:
            signal.setitimer(signal.ITIMER_REAL, 0)
            ok = False
            why = "timeout" if isinstance(exc, _TestTimeout) else (type(exc).__name__ + ": " + str(exc)[:200])
        report({"test": i, "ok": ok, "why": why})
    report({"done": True})

_main()
"""


async def _drain(stream: asyncio.StreamReader, keep: int, nonce: str, reports: list[dict] | None) -> bytes:
    """Read to EOF keeping ``keep`` bytes; pick out nonce-tagged report lines on the way."""
    kept = bytearray()
    carry = b""
    tag = nonce.encode() + b" "
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return bytes(kept)
        if len(kept) < keep:
            kept += chunk[: keep - len(kept)]
        if reports is not None:
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()[-4096:]  # report lines are short; a long partial line is not one
            for line in lines:
                if line.startswith(tag):
                    with contextlib.suppress(ValueError):
                        reports.append(json.loads(line[len(tag) :]))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def _rmtree(path: str) -> None:
    def fix(func, p, _exc):  # the child may have chmod-ed things read-only
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)

    shutil.rmtree(path, onerror=fix)
    shutil.rmtree(path, ignore_errors=True)


async def run_python_tests(code: str, tests: list, mode: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code`` then each test in a sandboxed child; see the module docstring for the layers.

    ``mode="assert"``: each test is Python source (assert statements) run after the code.
    ``mode="io"``: each test is ``{"input": str, "output": str}``; the code runs as ``__main__``
    with that stdin, and its stdout must equal the output (trailing whitespace ignored).
    """
    if mode not in ("assert", "io"):
        raise ValueError(f"mode must be 'assert' or 'io', got {mode!r}")
    layers = await asyncio.to_thread(available_layers)
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="rllm-code-")
    cgroup = _Cgroup.create(limits.max_processes + 2) if layers["processes"] == "cgroup" else None
    if layers["processes"] == "cgroup" and cgroup is None:
        layers["processes"] = "prelude"
    nproc = None
    if layers["processes"] == "rlimit":  # counts every process of this user, so add what already runs
        nproc = _user_process_count() + limits.max_processes
    flags = _unshare_flags() if limits.isolate_network else None
    nonce = secrets.token_hex(16)
    cfg = {
        "nonce": nonce,
        "mode": mode,
        "code": code,
        "tests": tests,
        "memory_mb": limits.memory_mb,
        "max_file_mb": limits.max_file_mb,
        "cpu_seconds": max(1, int(limits.cpu_seconds)),
        "test_timeout": limits.test_timeout,
        "nproc": nproc,
        "block_network": limits.isolate_network and layers["network"] == "prelude",
        "block_spawn": layers["processes"] == "prelude",
    }
    runner = Path(workdir, "_runner.py")
    runner.write_text(_RUNNER)
    cmd: list[str] = [limits.python, "-I", "-B", str(runner)]
    if flags:
        cmd = [*flags, *cmd]
    if cgroup is not None:  # join the cgroup before anything else runs, so no fork escapes it
        cmd = [
            "/bin/sh",
            "-c",
            'echo $$ > "$1" || exit 125; shift; exec "$@"',
            "sh",
            str(cgroup.path / "cgroup.procs"),
            *cmd,
        ]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    reports: list[dict] = []
    timed_out = False
    proc = None
    out = err = b""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
        proc.stdin.write((json.dumps(cfg) + "\n").encode())
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        proc.stdin.close()
        readers = asyncio.gather(
            _drain(proc.stdout, limits.max_output_bytes, nonce, reports),
            _drain(proc.stderr, limits.max_output_bytes, nonce, None),
        )
        try:
            out, err = await asyncio.wait_for(asyncio.shield(readers), timeout=limits.timeout)
            await asyncio.wait_for(proc.wait(), timeout=max(0.1, limits.timeout - (time.monotonic() - start)))
        except asyncio.TimeoutError:
            timed_out = True
        _kill_group(proc.pid)
        if cgroup is not None:
            await asyncio.to_thread(cgroup.destroy)
        # Pipes close once every holder is dead; a setsid-escaped grandchild (no cgroup/pidns) may
        # hold them open, so give up after a moment rather than hang.
        try:
            out, err = await asyncio.wait_for(readers, timeout=2)
        except asyncio.TimeoutError:
            readers.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=2)
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc.pid)
        if cgroup is not None:
            await asyncio.to_thread(cgroup.destroy)
        await asyncio.to_thread(_rmtree, workdir)
    passed = [False] * len(tests)
    details = ["no result (the process exited early or was killed, e.g. at the CPU-time limit)"] * len(tests)
    load_error = None
    for report in reports:
        if "load_error" in report:
            load_error = str(report["load_error"])
        elif isinstance(report.get("test"), int) and 0 <= report["test"] < len(tests):
            passed[report["test"]] = bool(report.get("ok"))
            details[report["test"]] = str(report.get("why", ""))
    if load_error:
        details = [f"code failed to load: {load_error}"] * len(tests)
    if timed_out:
        details = [
            d.replace("exited early or was killed, e.g. at the CPU-time limit", "was killed at the wall-time limit")
            for d in details
        ]
    return SandboxResult(
        passed=passed,
        details=details,
        returncode=proc.returncode if proc else None,
        timed_out=timed_out,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        load_error=load_error,
        layers=layers,
        elapsed=time.monotonic() - start,
    )


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
    return count
