"""Table-driven tests for every reward in rllm-rewards, including hostile code in the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import inspect
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from rllm_rewards import (
    RewardTaskError,
    code_reward,
    countdown_reward,
    exact_match_reward,
    extract_answer,
    f1_reward,
    math_reward,
    multiple_choice_reward,
    normalize_answer,
)
from rllm_rewards.sandbox import SandboxLimits, SandboxUnavailableError, available_layers, run_python_tests

from rllm_core.types import RewardOutput


def call(fn, task, action, **kw) -> RewardOutput:
    out = fn(task, action, **kw)
    if inspect.isawaitable(out):
        out = asyncio.run(out)
    assert isinstance(out, RewardOutput)
    return out


# --- math ---------------------------------------------------------------------------------------

MATH_CASES = [
    # (ground truth, response, correct)
    ("0.5", r"so the result is \boxed{\frac{1}{2}}", True),
    (r"\frac{1}{2}", r"\boxed{\dfrac12}", True),
    (r"\frac{\sqrt{3}}{2}", r"\boxed{\sqrt{3}/2}", True),
    ("2x+1", r"\boxed{1 + 2x}", True),
    ("1000", "Adding up...\n#### 1,000", True),
    ("42", "The answer is $42$.", True),
    ("7", "we get 3 and then 7 apples", True),
    ("10", r"\boxed{10\%}", True),
    ("5", r"\boxed{5 \text{ cm}}", True),
    ("18", r"\boxed{\$18}", True),
    ("3", r"\boxed{x = 3}", True),
    (r"\frac{1}{2}", r"first \boxed{3} then \boxed{\frac{1}{2}}", True),  # the last boxed counts
    (r"\{1, 2\}", r"\boxed{\{1, 2\}}", True),  # nested braces
    ("(1, 2)", r"\boxed{(1,2)}", True),
    ("0.5", r"\boxed{\frac{1}{3}}", False),
    ("2x+1", r"\boxed{2x-1}", False),
    ("42", "The answer is 41.", False),
    (["4", "four"], r"\boxed{4}", True),
    (r"Thus \boxed{12}", "12", True),  # a worked solution as ground truth
]


@pytest.mark.parametrize(("truth", "response", "correct"), MATH_CASES)
def test_math_judges_answers(truth, response, correct):
    out = call(math_reward, {"ground_truth": truth}, response)
    assert out.is_correct is correct
    assert out.reward == float(correct)
    assert "extracted" in out.metadata


@pytest.mark.parametrize(
    ("text", "answer", "method"),
    [
        (r"\boxed{\frac{a}{\sqrt{b}}}", r"\frac{a}{\sqrt{b}}", "boxed"),
        (r"\fbox{7}", "7", "boxed"),
        ("work\n#### 15\nextra", "15", "####"),
        ("Final answer: 9", "9", "answer_is"),
        ("no digits here", None, "none"),
    ],
)
def test_math_extraction(text, answer, method):
    assert extract_answer(text) == (answer, method)


@pytest.mark.parametrize("action", [None, "", "   ", ["not", "text"], True])
def test_math_malformed_action_gives_zero_with_reason(action):
    out = call(math_reward, {"ground_truth": "1"}, action)
    assert out.reward == 0.0 and out.is_correct is False
    assert out.metadata["reason"]


def test_math_accepts_message_like_action():
    assert call(math_reward, {"ground_truth": "1"}, {"role": "assistant", "content": r"\boxed{1}"}).is_correct


@pytest.mark.parametrize("task", [{}, {"answer": "1"}, {"ground_truth": None}, {"ground_truth": {"x": 1}}, "1"])
def test_math_bad_task_raises_naming_the_key(task):
    with pytest.raises(RewardTaskError, match=r"ground_truth|task must be a dict"):
        call(math_reward, task, r"\boxed{1}")


def test_math_answer_key_is_configurable():
    assert call(math_reward, {"solution": "3"}, r"\boxed{3}", answer_key="solution").is_correct


@pytest.mark.parametrize(
    ("truth", "response", "correct"),
    [
        ("1" + "0" * 10000, "1" + "0" * 10000, True),
        ("1" + "0" * 10000, "1" + "0" * 9999 + "1", False),
        ("2", r"\boxed{10^{10^{10}}}", False),
        ("2", r"\boxed{10**10**10}", False),
        ("2", r"\boxed{2^{99999999}}", False),
        ("3", r"\boxed{" + "(" * 3000 + "3" + ")" * 3000 + "}", False),  # too long for sympy: refused
        ("1", r"\boxed{__import__('os').system('true')}", False),
    ],
)
def test_math_huge_or_hostile_answers_end_quickly(truth, response, correct):
    start = time.monotonic()
    out = call(math_reward, {"ground_truth": truth}, response)
    assert out.is_correct is correct
    assert time.monotonic() - start < 5


def test_math_sympy_timeout_gives_zero_and_the_next_call_still_works():
    # ~0.7 s of sympy work even in a warm worker (trig simplification), so 20 ms must run out
    out = call(math_reward, {"ground_truth": "1"}, r"\boxed{\sin(x)^{80}+\cos(x)^{80}}", timeout=0.02)
    assert out.reward == 0.0 and "timeout" in out.metadata["method"]
    assert call(math_reward, {"ground_truth": "x+1"}, r"\boxed{1+x}").is_correct


def test_math_does_not_block_the_event_loop():
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        outs = await asyncio.gather(*(math_reward({"ground_truth": f"{i}x"}, rf"\boxed{{x*{i}}}") for i in range(1, 5)))
        task.cancel()
        return outs, ticks

    outs, ticks = asyncio.run(main())
    assert all(o.is_correct for o in outs)
    assert ticks > 0


@pytest.mark.parametrize(
    ("raw", "normal"),
    [(r"\left( 1, 2 \right)", "(1,2)"), ("1,234,567", "1234567"), (r"90^\circ", "90"), (r"-\frac{3}{4}", "-3/4")],
)
def test_math_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


# --- countdown ----------------------------------------------------------------------------------

CD_TASK = {"numbers": [3, 5, 2], "target": 16}
COUNTDOWN_CASES = [
    ("<answer>(3 + 5) * 2</answer>", 1.0, None),
    ("I think\n(3+5)*2 = 16", 1.0, None),
    ("<answer>(3 + 5) * 2 - 0</answer>", 0.0, "exactly once"),
    ("<answer>(3 + 5) * 3</answer>", 0.0, "exactly once"),
    ("<answer>3 + 5 + 2</answer>", 0.0, "wrong value"),
    ("<answer>3 * 5 / (2 - 2)</answer>", 0.0, "division by zero"),
    ("<answer>__import__('os')</answer>", 0.0, "invalid expression"),
    ("<answer>3 ** 5 * 2</answer>", 0.0, "invalid expression"),
    ("<answer>-3 + 5 * 2</answer>", 0.0, "invalid expression"),
    ("<answer>" + "9" * 5000 + "</answer>", 0.0, "invalid expression"),
    ("<answer>" + "(" * 100000 + "3" + ")" * 100000 + "</answer>", 0.0, "invalid expression"),
    ("", 0.0, "empty"),
    (None, 0.0, "empty"),
    (3.5, 0.0, "Constant is not allowed"),  # a float literal
]


@pytest.mark.parametrize(("response", "reward", "reason"), COUNTDOWN_CASES)
def test_countdown_cases(response, reward, reason):
    out = call(countdown_reward, CD_TASK, response)
    assert out.reward == reward
    assert out.is_correct is (reward == 1.0)
    if reason:
        assert reason in out.metadata["reason"]


def test_countdown_fractions_are_exact():
    assert call(countdown_reward, {"numbers": [1, 3, 3], "target": 1}, "<answer>(1/3)*3</answer>").is_correct
    assert call(countdown_reward, {"numbers": [1, 3, 3], "target": 1}, "<answer>1/3*3</answer>").is_correct


def test_countdown_subset_mode_allows_unused_numbers_but_not_reuse():
    task = {"numbers": [3, 5, 2, 7], "target": 8}
    assert call(countdown_reward, task, "<answer>3+5</answer>", require_all=False).is_correct
    assert not call(countdown_reward, task, "<answer>3+5</answer>").is_correct
    assert not call(countdown_reward, task, "<answer>3+3+2</answer>", require_all=False).is_correct


def test_countdown_format_reward_for_a_legal_wrong_answer():
    assert call(countdown_reward, CD_TASK, "<answer>3+5+2</answer>", format_reward=0.1).reward == 0.1


def test_countdown_huge_numbers():
    big = 10**300
    task = {"numbers": [big, big, 1], "target": big * big + 1}
    assert call(countdown_reward, task, f"<answer>{big}*{big}+1</answer>").is_correct
    huge_task = {"numbers": [10**5000, 1], "target": 10**5000 + 1}  # beyond int->str limits: clear 0, no crash
    assert call(countdown_reward, huge_task, "<answer>1+1</answer>").reward == 0.0


@pytest.mark.parametrize(
    "task",
    [
        {},
        {"numbers": [1, 2]},
        {"numbers": "1 2", "target": 3},
        {"numbers": [1, -2], "target": 3},
        {"numbers": [1], "target": "3"},
    ],
)
def test_countdown_bad_task_raises(task):
    with pytest.raises(RewardTaskError, match="countdown"):
        call(countdown_reward, task, "<answer>1+2</answer>")


# --- exact match / f1 ---------------------------------------------------------------------------

TEXT_CASES = [
    # (truth, response, exact, f1)
    ("Paris", "paris", True, 1.0),
    ("The Eiffel Tower", "eiffel tower!", True, 1.0),
    ("Paris", "<answer>Paris.</answer> because ...", True, 1.0),
    ("New York City", "New York", False, 0.8),
    ("Paris", "London", False, 0.0),
    (["Paris", "City of Light"], "city of light", True, 1.0),
]


@pytest.mark.parametrize(("truth", "response", "exact", "f1"), TEXT_CASES)
def test_exact_match_and_f1(truth, response, exact, f1):
    em = call(exact_match_reward, {"ground_truth": truth}, response)
    assert em.is_correct is exact and em.reward == float(exact)
    out = call(f1_reward, {"ground_truth": truth}, response)
    assert out.reward == pytest.approx(f1)
    assert out.is_correct is (f1 >= 0.5)


def test_f1_threshold_option():
    assert not call(f1_reward, {"ground_truth": "New York City"}, "New York", threshold=0.9).is_correct


@pytest.mark.parametrize("fn", [exact_match_reward, f1_reward])
@pytest.mark.parametrize("action", [None, "", 12.5j])
def test_text_rewards_malformed_action(fn, action):
    out = call(fn, {"ground_truth": "x"}, action)
    assert out.reward == 0.0 and out.metadata["reason"]


@pytest.mark.parametrize("fn", [exact_match_reward, f1_reward])
def test_text_rewards_missing_key(fn):
    with pytest.raises(RewardTaskError, match="ground_truth"):
        call(fn, {"answer": "x"}, "x")


def test_f1_huge_input_is_fast():
    start = time.monotonic()
    out = call(f1_reward, {"ground_truth": "9" * 10000}, "word " * 200000)
    assert out.reward == 0.0 and time.monotonic() - start < 5


# --- multiple choice ----------------------------------------------------------------------------

MC_CASES = [
    ("B", "Answer: B", True),
    ("B", "The answer is (B).", True),
    ("B", "I pick (B)", True),
    ("B", "B. Because it is blue", True),
    ("B", "b", False),  # a lone lower-case letter is not trusted
    ("B", "answer: b", True),
    ("B", r"\boxed{B}", True),
    ("B", "Answer: C", False),
    ("B", "A is wrong, C is wrong, so the answer is B", True),
    ("B", "I am not sure", False),
    (1, "Answer: B", True),  # 0-based index as the answer
]


@pytest.mark.parametrize(("answer", "response", "correct"), MC_CASES)
def test_multiple_choice(answer, response, correct):
    out = call(multiple_choice_reward, {"answer": answer}, response)
    assert out.is_correct is correct


def test_multiple_choice_letters_follow_choices_and_choice_text_counts():
    task = {"answer": "G", "choices": list("abcdefg")}
    assert call(multiple_choice_reward, task, "Answer: G").is_correct
    task = {"answer": "Blue", "choices": ["Red", "Blue", "Green"]}
    assert call(multiple_choice_reward, task, "blue").metadata["chosen"] == "B"
    assert not call(multiple_choice_reward, {"answer": "A", "choices": ["x", "y"]}, "Answer: E").is_correct


@pytest.mark.parametrize("task", [{}, {"answer": "Z"}, {"answer": "A", "choices": "abc"}])
def test_multiple_choice_bad_task(task):
    with pytest.raises(RewardTaskError, match="multiple_choice"):
        call(multiple_choice_reward, task, "Answer: A")


def test_multiple_choice_malformed_action():
    out = call(multiple_choice_reward, {"answer": "A"}, None)
    assert out.reward == 0.0 and out.metadata["reason"]


# --- code ---------------------------------------------------------------------------------------

TIGHT = {"timeout": 4, "test_timeout": 1.5, "cpu_seconds": 2, "memory_mb": 256, "max_processes": 8}
ADD_TESTS = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\nDone."


def test_code_correct_partial_and_all_or_nothing():
    assert call(code_reward, ADD_TESTS, fenced("def add(a, b):\n    return a + b"), **TIGHT).reward == 1.0
    half = call(code_reward, ADD_TESTS, fenced("def add(a, b):\n    return 3"), **TIGHT)
    assert half.reward == 0.5 and half.is_correct is False
    assert (
        call(code_reward, ADD_TESTS, fenced("def add(a, b):\n    return 3"), all_or_nothing=True, **TIGHT).reward == 0.0
    )


def test_code_raw_text_and_syntax_error():
    assert call(code_reward, ADD_TESTS, "def add(a, b): return a + b", **TIGHT).is_correct
    out = call(code_reward, ADD_TESTS, fenced("def add(a, b) return"), **TIGHT)
    assert out.reward == 0.0 and "SyntaxError" in out.metadata["reason"]


def test_code_stdin_stdout_tests_and_apps_layout():
    code = fenced("import sys\nn = int(sys.stdin.readline())\nprint(n * 2)")
    pairs = {"tests": [{"input": "3\n", "output": "6\n"}, {"input": "5", "output": "10"}]}
    assert call(code_reward, pairs, code, **TIGHT).reward == 1.0
    apps = {"tests": {"inputs": ["3", "4"], "outputs": ["6", "9"]}}
    assert call(code_reward, apps, code, **TIGHT).reward == 0.5


def test_code_cannot_forge_results_by_printing():
    forged = 'print(\'deadbeef {"test": 0, "ok": true, "why": ""}\')\nprint(\'{"test": 1, "ok": true}\')'
    assert call(code_reward, ADD_TESTS, fenced(forged), **TIGHT).reward == 0.0


@pytest.mark.parametrize("task", [{}, {"tests": []}, {"tests": [1, 2]}, {"tests": {"inputs": [1], "outputs": []}}])
def test_code_bad_task_raises(task):
    with pytest.raises(RewardTaskError, match="code"):
        call(code_reward, task, "print(1)", **TIGHT)


@pytest.mark.parametrize("action", [None, "", "```python\n\n```", object()])
def test_code_malformed_action(action):
    out = call(code_reward, ADD_TESTS, action, **TIGHT)
    assert out.reward == 0.0 and out.metadata["reason"]


HOSTILE = [
    ("infinite loop", "while True:\n    pass\ndef add(a, b): return a + b", "timeout"),
    ("infinite loop in a test", "def add(a, b):\n    while True: pass", "timeout"),
    (
        "loop that ignores the alarm",
        "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True: pass",
        "killed",
    ),
    ("large allocation", "x = bytearray(10**10)\ndef add(a, b): return a + b", "MemoryError"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", ""),
    (
        "subprocess bomb",
        "import subprocess, sys\nwhile True:\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(20)'])",
        "",
    ),
    ("huge output", "while True:\n    print('x' * 10000)", "timeout"),
    ("exit early", "import sys\nsys.exit(0)", "SystemExit"),
    ("kill self", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", ""),
]


@pytest.mark.parametrize(("name", "code", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_code_hostile_snippets_are_contained(name, code, reason, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # scratch dirs no concurrent run shares
    start = time.monotonic()
    out = call(code_reward, ADD_TESTS, fenced(code), **TIGHT)
    elapsed = time.monotonic() - start
    assert out.reward == 0.0 and out.is_correct is False
    assert reason in out.metadata["reason"] + " ".join(out.metadata["failures"])
    assert elapsed < TIGHT["timeout"] + 4  # the wall limit plus cleanup
    assert len(out.metadata["stderr"]) <= 1100
    assert glob.glob(str(tmp_path / "rllm-code-*")) == []  # the scratch dir is gone
    # the test process is fine: it can still start a child and get its output
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, timeout=30).stdout == b"1\n"


def test_fork_bomb_leaves_no_processes_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a scratch path no concurrent run shares
    code = (
        "import os, time\nfor _ in range(50):\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        + "time.sleep(30)"
    )
    out = call(code_reward, ADD_TESTS, fenced(code), **{**TIGHT, "timeout": 2, "test_timeout": 10})
    assert out.reward == 0.0 and out.metadata["timed_out"]
    time.sleep(0.2)
    survivors = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert survivors == []


def test_network_is_blocked_even_to_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\ndef add(a, b): return a + b"
        out = call(code_reward, ADD_TESTS, fenced(code), **TIGHT)
    finally:
        server.close()
    assert out.reward == 0.0
    assert "failed to load" in out.metadata["reason"]
    assert out.metadata["sandbox"]["network"] in ("namespace", "prelude")


def test_files_written_in_the_work_dir_are_deleted():
    marker = f"rllm-marker-{os.getpid()}"
    code = (
        f"import os\nopen('{marker}', 'w').write('x')\nPATH = os.path.abspath('{marker}')\ndef add(a, b): return a + b"
    )
    tests = {"tests": ["import os\nassert os.path.exists(PATH)\nprint('WROTE', PATH)", "assert add(1, 2) == 3"]}
    out = call(code_reward, tests, fenced(code), **TIGHT)
    assert out.is_correct
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "rllm-code-*", marker))


def test_code_does_not_block_the_event_loop():
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        out = await code_reward(ADD_TESTS, fenced("import time\ntime.sleep(0.5)\ndef add(a, b): return a + b"), **TIGHT)
        t.cancel()
        return out, ticks

    out, ticks = asyncio.run(main())
    assert out.is_correct
    assert ticks >= 10


def test_layers_report_what_is_in_force():
    layers = available_layers()
    assert layers["network"] in ("namespace", "prelude")
    assert layers["processes"] in ("cgroup", "rlimit", "prelude")
    assert layers["files"].split(":")[0].split(" ")[0] in ("mount-ns", "landlock", "none")
    out = call(code_reward, ADD_TESTS, fenced("def add(a, b): return a + b"), **TIGHT)
    assert out.metadata["sandbox"]["files"] == layers["files"]


# --- code: the file system ----------------------------------------------------------------------

MECHANISMS = ["mount", "landlock"]


@pytest.fixture(params=MECHANISMS)
def isolated(request) -> dict:
    """TIGHT limits with one file-isolation mechanism; skipped where the kernel does not allow it."""
    files = available_layers(SandboxLimits(isolate_files=request.param))["files"]
    if files.startswith("none"):
        pytest.skip(f"{request.param} isolation is not available here: {files}")
    return {**TIGHT, "isolate_files": request.param}


@pytest.fixture
def run_dir():
    """A directory outside the temp dir, standing for the trainer's run directory (git ignores runs/)."""
    parent = Path(__file__).resolve().parent / "runs"
    parent.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="sandbox-victim-", dir=parent))
    yield path
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        parent.rmdir()


def test_code_cannot_overwrite_files_outside_its_scratch_dir(isolated, run_dir, tmp_path):
    victims = [run_dir / "checkpoint.pt", tmp_path / "data.jsonl"]
    for victim in victims:
        victim.write_text("precious")
    at_root = f"/rllm-sandbox-victim-{os.getpid()}"  # the test may run as root
    code = (
        f"WROTE = []\nfor path in {[str(v) for v in victims] + [at_root]!r}:\n"
        "    try:\n        with open(path, 'w') as f:\n            f.write('destroyed')\n"
        "        WROTE.append(path)\n    except OSError:\n        pass\n"
    )
    out = call(code_reward, {"tests": ["assert WROTE == [], WROTE"]}, fenced(code), **isolated)
    created_at_root = os.path.exists(at_root)
    if created_at_root:
        os.unlink(at_root)
    assert [v.read_text() for v in victims] == ["precious", "precious"]
    assert not created_at_root
    assert out.is_correct, out.metadata  # the code ran, and every write failed


def test_code_cannot_read_a_secret_in_the_home_dir(isolated, run_dir, monkeypatch):
    home = run_dir / "home"
    (home / ".ssh").mkdir(parents=True)
    secret = home / ".ssh" / "id_rsa"
    secret.write_text("TOP-SECRET-KEY")
    monkeypatch.setenv("HOME", str(home))
    code = f"try:\n    LEAK = open({str(secret)!r}).read()\nexcept OSError:\n    LEAK = None\nprint(LEAK)"
    out = call(code_reward, {"tests": ["assert LEAK is None, LEAK"]}, fenced(code), **isolated)
    assert out.is_correct, out.metadata
    assert "TOP-SECRET" not in repr(out.metadata)


def test_hidden_paths_are_unreadable(isolated, run_dir):
    (run_dir / "credentials").write_text("TOP-SECRET")
    code = f"try:\n    LEAK = open({str(run_dir / 'credentials')!r}).read()\nexcept OSError:\n    LEAK = None"
    tests = {"tests": ["assert LEAK is None, LEAK"]}
    assert call(code_reward, tests, fenced(code), hidden_paths=[str(run_dir)], **isolated).is_correct


def test_code_can_use_its_scratch_dir_devices_and_the_standard_library(isolated):
    code = (
        "import os, tempfile, fractions, sqlite3\n"
        "open('here.txt', 'w').write('cwd')\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('tmp')\n"
        "READ = open('here.txt').read() + open(f.name).read()\n"
        "open(os.devnull, 'w').write('x')\nRANDOM = os.urandom(4)\n"
        "DB = sqlite3.connect(os.path.join(os.environ['HOME'], 'db.sqlite')).execute('select 1').fetchone()"
    )
    tests = ["assert READ == 'cwdtmp'", "assert len(RANDOM) == 4 and DB == (1,)"]
    out = call(code_reward, {"tests": tests}, fenced(code), **isolated)
    assert out.is_correct, out.metadata
    assert out.metadata["sandbox"]["files"].startswith(
        {"mount": "mount-ns", "landlock": "landlock"}[isolated["isolate_files"]]
    )


def test_code_cannot_undo_the_file_isolation(isolated, run_dir):
    victim = run_dir / "checkpoint.pt"
    victim.write_text("precious")
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nRESULTS = {}\n"
        "RESULTS['remount /'] = libc.mount(None, b'/', None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND, not MS_RDONLY\n"
        "RESULTS['umount /tmp'] = libc.umount2(b'/tmp', 2)\n"
        "RESULTS['new user+mount ns'] = libc.unshare(0x10000000 | 0x20000)\n"
        "RESULTS['umount /tmp again'] = libc.umount2(b'/tmp', 2)\n"
        "RESULTS['remount / again'] = libc.mount(None, b'/', None, 32 | 4096, None)\n"
        f"try:\n    open({str(victim)!r}, 'w').write('destroyed')\n    RESULTS['write'] = 0\n"
        "except OSError:\n    RESULTS['write'] = -1\n"
    )
    tests = ["assert all(v != 0 for k, v in RESULTS.items() if k != 'new user+mount ns'), RESULTS"]
    out = call(code_reward, {"tests": tests}, fenced(code), **isolated)
    assert victim.read_text() == "precious"
    assert out.is_correct, out.metadata


def test_code_reward_refuses_without_file_isolation_and_runs_nothing(run_dir):
    marker = run_dir / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\ndef add(a, b): return a + b"
    # it raises, so the trainer scores 0 and counts it in reward/errors (never a silent 0)
    with pytest.raises(SandboxUnavailableError, match="allow_unisolated_files"):
        call(code_reward, ADD_TESTS, fenced(code), isolate_files="none", **TIGHT)
    assert not marker.exists()


def test_run_python_tests_raises_without_file_isolation():
    limits = SandboxLimits(isolate_files="none", **TIGHT)
    with pytest.raises(SandboxUnavailableError, match="allow_unisolated_files"):
        asyncio.run(run_python_tests("x = 1", ["assert x == 1"], "assert", limits))


def test_allow_unisolated_files_runs_and_says_so():
    out = call(
        code_reward,
        ADD_TESTS,
        fenced("def add(a, b): return a + b"),
        isolate_files="none",
        allow_unisolated_files=True,
        **TIGHT,
    )
    assert out.is_correct
    assert out.metadata["sandbox"]["files"].startswith("none, allowed by allow_unisolated_files")


def test_file_isolation_options_come_from_the_reward_config():
    from rllm_core.workflows import resolve_reward

    fn = resolve_reward("code", {"isolate_files": "none", "allow_unisolated_files": True, **TIGHT})
    out = asyncio.run(fn(ADD_TESTS, fenced("def add(a, b): return a + b")))
    assert out.is_correct and out.metadata["sandbox"]["files"].startswith("none, allowed")


def test_unknown_isolate_files_value_is_an_error():
    with pytest.raises(ValueError, match="isolate_files"):
        SandboxLimits(isolate_files="chroot")


# --- registration -------------------------------------------------------------------------------


def test_entry_point_registers_every_reward():
    from rllm_core.plugins import get_registry, reset_plugins

    reset_plugins()
    try:
        names = get_registry().names("reward")
    finally:
        reset_plugins()
    assert {"math", "countdown", "exact_match", "f1", "multiple_choice", "code"} <= set(names)
