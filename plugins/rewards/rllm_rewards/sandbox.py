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
* **files**: the child sees the machine's files read-only, except its own fresh scratch directory
  (cwd, HOME, TMPDIR; deleted afterwards, files capped by RLIMIT_FSIZE). Home directories, the
  temp dirs (other runs' scratch dirs), ``/run``, ``/dev`` and ``SandboxLimits.hidden_paths`` are
  hidden, except the interpreter's own files, which stay readable; ``/dev`` keeps ``null``,
  ``zero``, ``full``, ``random`` and ``urandom``. The first mechanism of ``isolate_files`` that
  works here is used (``layers["files"]`` names it):

  - ``mount-ns``: a mount namespace (``unshare -m``, with ``-r`` when not root) in which the
    child, before any candidate code runs, makes every mount read-only (``mount_setattr``, Linux
    >= 5.12), puts read-only tmpfs over the hidden directories, mounts back its scratch dir
    (read-write) and the interpreter (read-only), a fresh ``/proc`` (with the PID namespace) and
    a private ``/dev/shm``;
  - ``landlock``: a Landlock ruleset (ABI >= 3, Linux >= 6.2; no privileges needed): read all but
    the hidden directories, write only the scratch dir and those ``/dev`` nodes. It does not cover
    connecting to Unix sockets, nor hide other processes in ``/proc``.

  Either way the child then drops every capability and sets ``no_new_privs``, so it cannot undo
  the mounts (a nested user namespace inherits them locked) or regain privileges through setuid
  programs. When no mechanism works, :func:`run_python_tests` raises
  :class:`SandboxUnavailableError` before starting anything, unless ``allow_unisolated_files``.
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
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SandboxLimits", "SandboxResult", "SandboxUnavailableError", "available_layers", "run_python_tests"]

_FILE_MECHANISMS = {"auto": ("mount", "landlock"), "mount": ("mount",), "landlock": ("landlock",), "none": ()}


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
    isolate_files: str = "auto"
    """How the child is kept off the trainer's files: ``"auto"`` (a mount namespace, else Landlock),
    ``"mount"``, ``"landlock"``, or ``"none"`` (no isolation, so runs are refused unless
    ``allow_unisolated_files``)."""
    allow_unisolated_files: bool = False
    """Run even where no file isolation works; the child can then read and write every file the
    trainer's user can (checkpoints, data, code, the home directory)."""
    hidden_paths: tuple[str, ...] = ()
    """More directories the child must not see, besides the home directories, the temp dirs,
    ``/run`` and ``/dev`` (hidden always)."""
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.isolate_files not in _FILE_MECHANISMS:
            raise ValueError(f"isolate_files must be one of {', '.join(_FILE_MECHANISMS)}; got {self.isolate_files!r}")
        hidden = (self.hidden_paths,) if isinstance(self.hidden_paths, str) else tuple(self.hidden_paths)
        object.__setattr__(self, "hidden_paths", hidden)  # a list from a YAML config would not hash


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


class SandboxUnavailableError(RuntimeError):
    """No file isolation works here and ``allow_unisolated_files`` is off, so the code was not run."""


# --- probing ------------------------------------------------------------------------------------


def _runs(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=1)
def _namespaces() -> tuple[tuple[str, ...], frozenset[str]] | None:
    """``unshare`` with the flags it needs here (``-r`` when unprivileged), and the namespaces
    ('net', 'mount', 'pid') it can make; None when it can make none."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    kinds = {"net": ("-n",), "mount": ("-m",), "pid": ("-p", "-f", "--kill-child")}
    for user in ((), ("-r",)):
        works = frozenset(kind for kind, flags in kinds.items() if _runs([exe, *user, *flags, "/bin/true"]))
        if works:
            return (exe, *user), works
    return None


def _unshare_command(network: bool, mount: bool) -> list[str]:
    """The ``unshare`` prefix for a child with these namespaces (plus a PID namespace), or []."""
    found = _namespaces()
    if found is None:
        return []
    prefix, works = found
    flags = [
        flag for kind, flag, wanted in (("mount", "-m", mount), ("net", "-n", network)) if wanted and kind in works
    ]
    if not flags:
        return []
    if "pid" in works:
        flags += ["-p", "-f", "--kill-child"]
    return [*prefix, *flags]


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


def _hidden_paths(limits: SandboxLimits) -> list[str]:
    """What the child must not see (it hides those that exist, but not its scratch dir or interpreter)."""
    homes = {"/root", "/home", os.path.expanduser("~")}
    with contextlib.suppress(KeyError):
        homes.add(pwd.getpwuid(os.getuid()).pw_dir)
    temps = {tempfile.gettempdir(), "/tmp", "/var/tmp"}  # the temp dir holds other runs' scratch dirs
    extra = [os.path.expanduser(p) for p in limits.hidden_paths]
    return sorted(homes | temps | {"/run", "/var/run", "/dev"}) + extra


def _child_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def _child_config(nonce: str, code: str, tests: list, mode: str, limits: SandboxLimits, files: dict, **extra) -> str:
    cfg = {
        "nonce": nonce,
        "mode": mode,
        "code": code,
        "tests": tests,
        "memory_mb": limits.memory_mb,
        "max_file_mb": limits.max_file_mb,
        "cpu_seconds": max(1, int(limits.cpu_seconds)),
        "test_timeout": limits.test_timeout,
        "files": files,
        **extra,
    }
    return json.dumps(cfg) + "\n"


def _files_config(mechanism: str | None, workdir: str, limits: SandboxLimits, cmd: list[str]) -> dict:
    return {
        "mode": mechanism or "none",
        "scratch": workdir,
        "hidden": _hidden_paths(limits),
        "pid_ns": "-p" in cmd,
        "shm_kb": limits.max_file_mb * 1024,
        "allow_unisolated": limits.allow_unisolated_files,
    }


def _reports(text: bytes, nonce: str) -> list[dict]:
    tag = nonce.encode() + b" "
    found = []
    for line in text.split(b"\n"):
        if line.startswith(tag):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line[len(tag) :]))
    return found


@functools.cache
def _probe_files(python: str, mechanism: str) -> tuple[bool, str]:
    """Set up ``mechanism`` in a child that runs no candidate code and checks that a write outside
    its scratch dir fails: (True, what the child reports) or (False, why not)."""
    if not sys.platform.startswith("linux"):
        return False, f"needs Linux, not {sys.platform}"
    cmd = _unshare_command(network=False, mount=True) if mechanism == "mount" else []
    if mechanism == "mount" and "-m" not in cmd:
        return False, "no mount namespace (`unshare -m` and `unshare -rm` fail)"
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="rllm-code-"))
    try:
        runner = Path(workdir, "_runner.py")
        runner.write_text(_RUNNER)
        cmd = [*cmd, python, "-I", "-B", str(runner)]
        files = {**_files_config(mechanism, workdir, SandboxLimits(python=python), cmd), "probe": True}
        nonce = secrets.token_hex(16)
        stdin = _child_config(nonce, "", [], "assert", SandboxLimits(), files, nproc=None)
        try:
            done = subprocess.run(
                cmd, input=stdin.encode(), capture_output=True, cwd=workdir, env=_child_env(workdir), timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"{type(exc).__name__}: {exc}"
    finally:
        _rmtree(workdir)
    for report in _reports(done.stdout, nonce):
        if "files" in report:
            return True, str(report["files"])
        if "refused" in report:
            return False, str(report["refused"])
    return False, f"the probe exited with status {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}"


_probe_lock = threading.Lock()  # the first calls of a training step arrive together: probe once


def _layers(limits: SandboxLimits) -> tuple[dict[str, str], str | None]:
    """(what each layer uses, the file mechanism to use or None: then ``files`` says why)."""
    with _probe_lock:
        found = _namespaces()
        works = found[1] if found else frozenset()
        layers = {
            "network": "namespace" if "net" in works else "prelude",
            "pid_namespace": "yes" if "pid" in works else "no",
        }
        if _cgroup_base() is not None:
            layers["processes"] = "cgroup"
        elif os.geteuid() != 0:
            layers["processes"] = "rlimit"
        else:
            layers["processes"] = "prelude"
        failures = []
        for mechanism in _FILE_MECHANISMS[limits.isolate_files]:
            ok, text = _probe_files(limits.python, mechanism)
            if ok:
                layers["files"] = text
                return layers, mechanism
            failures.append(f"{mechanism}: {text}")
        layers["files"] = "none (" + ("; ".join(failures) or "isolate_files='none'") + ")"
        return layers, None


def available_layers(limits: SandboxLimits | None = None) -> dict[str, str]:
    """Which containment layers work on this machine for these limits (probes once; blocking).

    ``files`` starts with ``mount-ns``, ``landlock`` or ``none``.
    """
    return _layers(limits or SandboxLimits())[0]


def _refusal(why: str) -> str:
    return (
        "the code sandbox cannot isolate the file system here, so the candidate code could read and "
        f"overwrite every file this user can (checkpoints, data, code, the home directory). {why}. "
        "Run where user namespaces (`unshare -rm true` succeeds) or Landlock (Linux >= 5.13) are allowed, "
        "or accept the risk with SandboxLimits(allow_unisolated_files=True) "
        "(in a config: reward.args.allow_unisolated_files: true)"
    )


# --- the child ----------------------------------------------------------------------------------

# Runs in the child before any candidate code: it builds the file-system view, then drops every
# privilege. Raises OSError when the mechanism does not work here.
_FILES_RUNNER = r"""
import ctypes, io, json, os, resource, signal, sys

_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# Syscalls added since Linux 5.1 have one number on every architecture but alpha and ia64.
_OPEN_TREE, _MOVE_MOUNT, _MOUNT_SETATTR, _LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 428, 429, 442, 444, 445, 446
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 1, 2, 4, 8, 0x4000, 0x40000
_ATTR_RDONLY, _ATTR_NOSUID, _ATTR_NODEV = 1, 2, 4

class _Sys:
    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)

    def check(self, ret, what):
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, what + ": " + os.strerror(err))
        return ret

    def call(self, nr, what, *args):
        conv = [ctypes.c_long(a) if isinstance(a, int) else os.fsencode(a) if isinstance(a, str) else a for a in args]
        return self.check(self.libc.syscall(ctypes.c_long(nr), *conv), what)

    def prctl(self, option, arg):
        return self.libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))

    def mount(self, src, target, fstype, flags, data=None):
        enc = lambda v: None if v is None else os.fsencode(v)
        self.check(self.libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), "mount " + target)

    def clone(self, path):  # a detached copy of the mount tree at path (OPEN_TREE_CLONE|CLOEXEC, AT_RECURSIVE)
        return self.call(_OPEN_TREE, "open_tree " + path, -100, path, 1 | 0o2000000 | 0x8000)

    def attach(self, fd, path):  # MOVE_MOUNT_F_EMPTY_PATH
        self.call(_MOVE_MOUNT, "move_mount " + path, fd, "", -100, path, 4)
        os.close(fd)

    def set_attrs(self, path, attrs, recursive):
        attr = (ctypes.c_uint64 * 4)(attrs, 0, 0, 0)
        flags = 0x8000 if recursive else 0
        self.call(_MOUNT_SETATTR, "mount_setattr " + path, -100, path, flags, ctypes.byref(attr), ctypes.c_size_t(32))

def _under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")

def _hidden(paths, scratch):
    found = []
    for p in sorted({os.path.realpath(p) for p in paths}):  # a parent sorts before its children
        if p != "/" and os.path.isdir(p) and not _under(p, scratch) and not any(_under(p, h) for h in found):
            found.append(p)
    return found

def _keep(scratch, hidden):
    # The interpreter's files that lie in a hidden directory: shown again, read-only.
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    found = []
    for p in sorted({os.path.realpath(p) for p in paths if p}):
        if (os.path.exists(p) and not _under(p, scratch) and any(_under(p, h) and p != h for h in hidden)
                and not any(_under(h, p) for h in hidden) and not any(_under(p, k) for k in found)):
            found.append(p)
    return found

def _mount_view(sc, f, scratch, hidden, keep):
    sc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    moves = [(p, os.path.isdir(p), sc.clone(p), _ATTR_RDONLY | _ATTR_NOSUID) for p in keep]
    if "/dev" in hidden:
        moves += [(p, False, sc.clone(p), _ATTR_NOSUID) for p in _DEVICES if os.path.exists(p)]
    moves.append((scratch, True, sc.clone(scratch), _ATTR_NOSUID | _ATTR_NODEV))
    sc.set_attrs("/", _ATTR_RDONLY | _ATTR_NOSUID, recursive=True)
    for h in hidden:
        sc.mount("tmpfs", h, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "mode=755,size=1m")
    for path, is_dir, fd, attrs in moves:
        if is_dir or not os.path.isdir(os.path.dirname(path)):
            os.makedirs(path if is_dir else os.path.dirname(path), exist_ok=True)
        if not is_dir and not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        sc.attach(fd, path)
        sc.set_attrs(path, attrs, recursive=True)
    if "/dev" in hidden:
        for name, target in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
            os.symlink("/proc/self/fd" + target, "/dev/" + name)
        os.mkdir("/dev/shm")
        sc.mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777,size=%dk" % f["shm_kb"])
    for h in hidden:
        sc.set_attrs(h, _ATTR_RDONLY, recursive=False)
    proc = ""
    if f["pid_ns"]:
        try:
            sc.mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY)
            proc = ", own /proc"
        except OSError:
            pass  # a container that masks parts of /proc forbids new proc mounts; the old one is read-only
    os.chdir(scratch)
    _drop_privileges(sc)
    return "mount-ns: read-only /, hidden " + " ".join(hidden) + proc

class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

def _landlock(sc, f, scratch, hidden, keep):
    # LANDLOCK_CREATE_RULESET_VERSION; fails where the kernel lacks Landlock or does not enable it
    abi = sc.call(_LL_CREATE, "Landlock (needs Linux >= 6.2 with landlock among its LSMs)", None, ctypes.c_size_t(0), 1)
    if abi < 3:  # before ABI 3 (Linux 6.2) Landlock does not cover truncate(2)
        raise OSError(95, "Landlock ABI %d cannot stop truncate(2); ABI 3 (Linux >= 6.2) can" % abi)
    handled = (1 << 15) - 1 | (1 << 15 if abi >= 5 else 0)  # every file right this ABI knows
    read = 1 | 4 | 8  # EXECUTE, READ_FILE, READ_DIR
    read_write = 2 | 4 | (1 << 14) | (1 << 15)  # WRITE_FILE, READ_FILE, TRUNCATE, IOCTL_DEV
    file_rights = handled & (1 | read_write)
    scoped = 3 if abi >= 6 else 0  # abstract Unix sockets and signals stay inside the sandbox
    attr = (ctypes.c_uint64 * 3)(handled, 0, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = sc.call(_LL_CREATE, "landlock_create_ruleset", ctypes.byref(attr), ctypes.c_size_t(size), 0)

    def allow(path, access):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = _PathBeneath(access & (handled if os.path.isdir(path) else file_rights), fd)
            sc.call(_LL_ADD_RULE, "landlock_add_rule " + path, ruleset, 1, ctypes.byref(rule), 0)
        finally:
            os.close(fd)

    # Landlock only grants, so grant reading on everything beside the hidden directories.
    partial = {"/"}
    for h in hidden:
        while h != "/":
            h = os.path.dirname(h)
            partial.add(h)
    for d in partial:
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if p not in partial and p not in hidden and not os.path.islink(p):
                try:
                    allow(p, read)
                except OSError:
                    pass  # vanished or unopenable: it stays unreadable
    for p in keep:
        allow(p, read)
    if "/dev" in hidden:
        for p in _DEVICES:
            if os.path.exists(p):
                allow(p, read_write)
    allow(scratch, handled)
    _drop_privileges(sc)
    sc.call(_LL_RESTRICT, "landlock_restrict_self", ruleset, 0)
    os.close(ruleset)
    return "landlock v%d: read-only /, hidden %s" % (abi, " ".join(hidden))

def _drop_privileges(sc):
    # Without CAP_SYS_ADMIN the mounts cannot be undone; no_new_privs stops setuid programs.
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            last = int(fh.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        sc.prctl(24, cap)  # PR_CAPBSET_DROP; fails without CAP_SETPCAP, when there is nothing to drop
    sc.prctl(47, 4)  # PR_CAP_AMBIENT_CLEAR_ALL
    sc.check(sc.libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()), "capset")
    sc.check(sc.prctl(38, 1), "no_new_privs")  # PR_SET_NO_NEW_PRIVS

def _isolate_files(f):
    if not sys.platform.startswith("linux"):  # the syscall numbers above are Linux's
        raise OSError(95, "file isolation needs Linux")
    scratch = f["scratch"]
    hidden = _hidden(f["hidden"], scratch)
    apply = {"mount": _mount_view, "landlock": _landlock}[f["mode"]]
    return apply(_Sys(), f, scratch, hidden, _keep(scratch, hidden))

def _probe_files(f):
    # Self-test: the scratch dir is writable, its parent (the hidden temp dir) is not, / is read-only.
    with open(os.path.join(f["scratch"], "probe"), "w") as fh:
        fh.write("ok")
    outside = os.path.join(os.path.dirname(f["scratch"]), "rllm-probe-" + os.path.basename(f["scratch"]))
    try:
        open(outside, "w").close()
    except OSError:
        pass
    else:
        os.unlink(outside)
        return "a file outside the scratch dir was still writable"
    if f["mode"] == "mount" and not os.statvfs("/").f_flag & os.ST_RDONLY:
        return "/ is still writable"
    return None
"""

_RUNNER_TESTS = r"""

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
    code, files = cfg.pop("code"), cfg.pop("files")
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
    layer = None
    if files["mode"] != "none":
        try:
            layer = _isolate_files(files)
        except Exception as exc:
            why = "%s isolation failed: %s" % (files["mode"], exc)
            if not files["allow_unisolated"]:
                report({"refused": why})
                return
            layer = "none, allowed by allow_unisolated_files (%s)" % why
    if files.get("probe"):
        problem = _probe_files(files)
        report({"refused": problem} if problem else {"files": layer})
        return
    if layer:
        report({"files": layer})
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


_RUNNER = _FILES_RUNNER + _RUNNER_TESTS


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

    Raises :class:`SandboxUnavailableError` (and runs nothing) when no file isolation works here,
    unless ``limits.allow_unisolated_files``.
    """
    if mode not in ("assert", "io"):
        raise ValueError(f"mode must be 'assert' or 'io', got {mode!r}")
    layers, files_mechanism = await asyncio.to_thread(_layers, limits)
    if files_mechanism is None:
        if not limits.allow_unisolated_files:
            raise SandboxUnavailableError(_refusal(f"Tried: {layers['files']}"))
        layers["files"] = "none, allowed by allow_unisolated_files " + layers["files"].removeprefix("none ")
    start = time.monotonic()
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="rllm-code-"))
    cgroup = _Cgroup.create(limits.max_processes + 2) if layers["processes"] == "cgroup" else None
    if layers["processes"] == "cgroup" and cgroup is None:
        layers["processes"] = "prelude"
    nproc = None
    if layers["processes"] == "rlimit":  # counts every process of this user, so add what already runs
        nproc = _user_process_count() + limits.max_processes
    runner = Path(workdir, "_runner.py")
    runner.write_text(_RUNNER)
    cmd = [
        *_unshare_command(network=limits.isolate_network, mount=files_mechanism == "mount"),
        limits.python,
        "-I",
        "-B",
        str(runner),
    ]
    if not limits.isolate_network:
        layers["network"] = "off"
    layers["pid_namespace"] = "yes" if "-p" in cmd else "no"
    nonce = secrets.token_hex(16)
    stdin = _child_config(
        nonce,
        code,
        tests,
        mode,
        limits,
        _files_config(files_mechanism, workdir, limits, cmd),
        nproc=nproc,
        block_network=limits.isolate_network and layers["network"] == "prelude",
        block_spawn=layers["processes"] == "prelude",
    )
    if cgroup is not None:  # join the cgroup before anything else runs, so no fork escapes it
        cmd = [
            "/bin/sh",
            "-c",
            'echo $$ > "$1" || exit 125; shift; exec "$@"',
            "sh",
            str(cgroup.path / "cgroup.procs"),
            *cmd,
        ]
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
            env=_child_env(workdir),
            start_new_session=True,
        )
        proc.stdin.write(stdin.encode())
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
    first = reports[0] if reports else {}  # the child's own report, before any candidate code ran
    if "refused" in first:
        raise SandboxUnavailableError(_refusal(f"The child said: {first['refused']}"))
    layers["files"] = str(first.get("files", layers["files"]))
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
