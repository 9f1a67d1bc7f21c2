"""``rllm serve``: the gateway in front of a config's rollout engine, run as a real subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import openai
import pytest
import yaml


@pytest.fixture
def served(tmp_path):
    """``rllm serve`` on the simulated backend with a CLI override; yields (process, printed settings)."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"backend": "simulated", "rollout": {"train_sampling": {"temperature": 0.5}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLLM_", "OPENAI_"))}
    cmd = [sys.executable, "-m", "rllm_core.cli", "serve", str(config), "--port", "0", "simulated.response_tokens=3"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed: dict[str, str] = {}
    try:
        for line in proc.stdout:  # until the banner's last line (or the process ends)
            name, sep, value = line.strip().removeprefix("export ").partition("=")
            if sep and name in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
                printed[name] = value
            if line.startswith("admin key: "):
                printed["admin"] = line.split(": ", 1)[1].strip()
            if line.startswith("serving until Ctrl-C"):
                break
        assert set(printed) == {"OPENAI_BASE_URL", "OPENAI_API_KEY", "admin"}, proc.stderr.read()
        yield proc, printed
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.timeout(90)
def test_serve_answers_the_openai_client_until_ctrl_c_then_exits_130(served):
    proc, printed = served
    url, key = printed["OPENAI_BASE_URL"], printed["OPENAI_API_KEY"]
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="rllm", messages=[{"role": "user", "content": "What is 2+3?"}])
    assert reply.choices[0].message.content.lstrip("-").isdigit()  # the simulated engine answers a number
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()

    base = url.split("/sessions/")[0]
    admin = {"Authorization": f"Bearer {printed['admin']}"}
    traces = httpx.get(f"{base}/sessions/debug/traces", headers=admin, timeout=30).json()["traces"]
    assert [t["messages"][-1]["content"] for t in traces] == ["What is 2+3?"]
    assert len(traces[0]["completion_ids"]) == 3  # the override on the command line reached the backend
    assert traces[0]["response"]["content"] == reply.choices[0].message.content
    assert httpx.get(f"{base}/sessions/debug/traces", timeout=30).status_code == 401

    opened = httpx.post(f"{base}/sessions", json={"session_id": "mine"}, headers=admin, timeout=30).json()
    other = openai.OpenAI(base_url=opened["base_url"], api_key=opened["api_key"], max_retries=0, timeout=30)
    other.chat.completions.create(model="rllm", messages=[{"role": "user", "content": "What is 1+1?"}])
    record = httpx.delete(f"{base}/sessions/mine", headers=admin, timeout=30).json()
    assert [t["messages"][-1]["content"] for t in record["traces"]] == ["What is 1+1?"]
    with pytest.raises(openai.AuthenticationError):  # consumed: its key no longer opens anything
        other.chat.completions.create(model="rllm", messages=[{"role": "user", "content": "again"}])

    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err


def test_serve_on_a_port_in_use_exits_2_naming_it(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("backend: simulated\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cmd = [sys.executable, "-m", "rllm_core.cli", "serve", str(config), "--port", port]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"--port {port}: cannot listen there" in out.stderr
