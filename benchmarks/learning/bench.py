"""Does it learn? The main job's multi-token task on seeds 0-2, rllm's torch backend against TRL.

    bash benchmarks/learning/run.sh                         # both sides, seeds 0 1 2 (TRL's own venv)
    bash benchmarks/learning/run.sh --impl rllm --seeds 0   # one side, one seed (no TRL needed)

Both sides train the same tiny Qwen2 (rllm-torch's builder, same settings and seed), the same
locally made tokenizer and chat template, the same 100 ``a+b=`` prompts and the same exact reward
(the sum's digits, zero-padded to ``reward.args.width``, then end-of-turn), with the same group
size and completion budget, each in its own subprocess. rllm runs the config as it is
(``--config``, default the multi-token example); TRL's ``GRPOTrainer`` runs its own recipe
(``--trl-*``: batch shape, lr, sampling temperature; ``loss_type=dapo``, token-level, its default).

Each run stops when the 10-step mean train reward reaches ``--target`` or after ``--budget-s``
seconds of training. Per seed it prints steps and seconds to the target (or the best 10-step mean
reached), completion tokens per second and peak RSS; then the ratios: rllm's time to the target
against TRL's best seed, and completion tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "../../examples/arith/config.yaml")
WINDOW = 10


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Tracker:
    """10-step mean of the train reward; says when to stop (target reached or budget spent)."""

    def __init__(self, target: float, budget_s: float) -> None:
        self.target, self.budget_s = target, budget_s
        self.start = time.perf_counter()
        self.window: deque[float] = deque(maxlen=WINDOW)
        self.rewards: list[float] = []
        self.tokens = 0.0
        self.best = 0.0
        self.hit: tuple[int, float] | None = None

    def add(self, reward: float, tokens: float) -> bool:
        """Record one step; True when the run should stop."""
        self.rewards.append(reward)
        self.tokens += tokens
        self.window.append(reward)
        elapsed = time.perf_counter() - self.start
        if len(self.window) == WINDOW:
            mean = sum(self.window) / WINDOW
            self.best = max(self.best, mean)
            if mean >= self.target and self.hit is None:
                self.hit = (len(self.rewards), elapsed)
        return self.hit is not None or elapsed >= self.budget_s

    def result(self) -> dict:
        wall = time.perf_counter() - self.start
        return {
            "steps": len(self.rewards),
            "wall_s": wall,
            "hit_step": self.hit[0] if self.hit else None,
            "hit_s": self.hit[1] if self.hit else None,
            "best10": self.best,
            "tok_s": self.tokens / wall if wall else 0.0,
        }


TRACKER: Tracker | None = None


class StopAtTarget:
    """A trainer hook (``hooks: {"__main__:StopAtTarget": {}}``) feeding the tracker each step."""

    def __init__(self, settings=None) -> None:
        pass

    from rllm_core.hookspecs import hookimpl

    @hookimpl
    def on_batch_end(self, trainer, metrics):
        assert TRACKER is not None
        if TRACKER.add(metrics["train/reward/mean"], metrics.get("train/tokens/response_sum", 0.0)):
            trainer.request_stop()


def _load(args: argparse.Namespace):
    from rllm_core import load_config

    return load_config(
        args.config,
        overrides=[
            f"trainer.seed={args.seed}",  # the main job's own total_steps and lr schedule
            "trainer.val_every=0",
            "trainer.val_at_end=false",
            "trainer.resume=off",
            f"trainer.run_dir={args.out}/rllm_seed{args.seed}",
            *([f"torch.num_threads={args.threads}"] if args.threads else []),
            *args.rllm_override,
        ],
    )


def run_rllm(args: argparse.Namespace) -> dict:
    global TRACKER
    from rllm_core import UnifiedTrainer

    config = _load(args)
    config.loggers = {}
    config.hooks = {**config.hooks, "__main__:StopAtTarget": {}}
    trainer = UnifiedTrainer(config)
    TRACKER = Tracker(args.target, args.budget_s)
    trainer.fit()
    return TRACKER.result()


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from rllm_torch.config import TinyModelSettings
    from rllm_torch.model import build_tiny_model, build_tiny_tokenizer
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    config = _load(args)
    torch.set_num_threads(args.trl_threads)
    tiny = TinyModelSettings(**config.section("torch").get("tiny", {}))
    tok = build_tiny_tokenizer(tiny.vocab)
    torch.manual_seed(args.seed)
    model = build_tiny_model(tiny, len(tok), tok.pad_token_id, tok.eos_token_id)
    width = int(config.reward.args.get("width", 1))
    max_tokens = int(config.rollout.train_sampling.get("max_tokens", 4))
    tasks = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": a + b} for a in range(10) for b in range(10)
    ]
    tracker = Tracker(args.target, args.budget_s)
    eos = tok.eos_token_id
    pending = {"rewards": [], "tokens": 0}

    def reward(completions, answer, completion_ids, **kw):
        out = []
        for ids, ans in zip(completion_ids, answer, strict=True):
            ids = list(ids)
            pending["tokens"] += len(ids)
            ended = bool(ids) and ids[-1] == eos
            words = tok.convert_ids_to_tokens(ids[:-1]) if ended else None
            out.append(1.0 if words == list(f"{ans:0{width}d}") else 0.0)
        pending["rewards"].extend(out)
        return out

    class Stop(TrainerCallback):
        def on_step_end(self, _args, state, control, **kw):
            rewards = pending["rewards"]
            if rewards and tracker.add(sum(rewards) / len(rewards), pending["tokens"]):
                control.should_training_stop = True
            pending["rewards"], pending["tokens"] = [], 0

    cfg = GRPOConfig(
        output_dir=f"{args.out}/trl_seed{args.seed}",
        learning_rate=args.trl_lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=args.trl_prompts * config.rollout.n,
        gradient_accumulation_steps=1,
        num_generations=config.rollout.n,
        max_completion_length=max_tokens,
        temperature=args.trl_temperature,
        beta=0.0,
        max_steps=100000,
        logging_steps=1000000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=cfg,
        train_dataset=Dataset.from_list(tasks * 1000),
        processing_class=tok,
        callbacks=[Stop()],
    )
    tracker.start = time.perf_counter()
    trainer.train()
    return tracker.result()


def child(args: argparse.Namespace) -> None:
    result = run_rllm(args) if args.impl == "rllm" else run_trl(args)
    result["peak_mb"] = _peak_mb()
    print("RESULT " + json.dumps(result), flush=True)


def _fmt(r: dict) -> str:
    hit = f"{r['hit_step']:>6} {r['hit_s']:>8.1f}" if r["hit_step"] else f"{'-':>6} {'-':>8}"
    return f"{hit} {r['best10']:>7.3f} {r['steps']:>6} {r['tok_s']:>9.0f} {r['peak_mb']:>8.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--target", type=float, default=0.9, help="10-step mean train reward to reach")
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds per run")
    p.add_argument("--threads", type=int, default=None, help="rllm's torch threads (default: the config's)")
    p.add_argument(
        "--trl-threads", type=int, default=2, help="TRL's torch threads (2: 143 s to 0.9 on seed 0, 1: 193 s)"
    )
    p.add_argument("--trl-lr", type=float, default=1e-4, help="TRL's learning rate (its tuned recipe: 1e-4)")
    p.add_argument("--trl-prompts", type=int, default=8, help="TRL's prompts per step (its tuned recipe: 8)")
    p.add_argument(
        "--trl-temperature",
        type=float,
        default=1.0,
        help="TRL's sampling temperature (its tuned recipe: 1.0, whatever rllm's config samples at)",
    )
    p.add_argument("--trl-seeds", type=int, nargs="+", default=None, help="TRL's seeds (default: --seeds)")
    p.add_argument("--impl", choices=["rllm", "trl", "both"], default="both")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--rllm-override", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    impls = ["rllm", "trl"] if args.impl == "both" else [args.impl]
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; config {args.config}")
    print(f"target: 10-step mean train reward >= {args.target}, budget {args.budget_s:.0f} s of training per run")
    print(f"{'impl':6} {'seed':>4} {'step@':>6} {'s@':>8} {'best10':>7} {'steps':>6} {'tok/s':>9} {'peak MB':>8}")
    results: dict[str, list[dict]] = {impl: [] for impl in impls}
    for impl in impls:
        for seed in args.trl_seeds if impl == "trl" and args.trl_seeds is not None else args.seeds:
            cmd = [sys.executable, __file__, "--child", "--impl", impl, "--seed", str(seed), "--config", args.config]
            cmd += [
                "--target",
                str(args.target),
                "--budget-s",
                str(args.budget_s),
                "--trl-threads",
                str(args.trl_threads),
            ]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--trl-lr", str(args.trl_lr), "--trl-prompts", str(args.trl_prompts), "--out", args.out]
            cmd += ["--trl-temperature", str(args.trl_temperature)]
            cmd += [f"--rllm-override={o}" for o in args.rllm_override]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{impl} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                sys.exit(1)
            r = json.loads(line[7:])
            results[impl].append(r)
            print(f"{impl:6} {seed:>4} {_fmt(r)}", flush=True)
    if len(impls) == 2:
        ours, trl = results["rllm"], results["trl"]
        hits = [r["hit_s"] for r in ours if r["hit_s"]]
        trl_hits = [r["hit_s"] for r in trl if r["hit_s"]]
        print(f"\nrllm reached the target on {len(hits)} of {len(ours)} seeds, TRL on {len(trl_hits)} of {len(trl)}")
        if hits and trl_hits:
            print(
                f"time to target: rllm worst seed {max(hits):.1f} s vs TRL best seed {min(trl_hits):.1f} s "
                f"-> {min(trl_hits) / max(hits):.2f}x (target >= 3x)"
            )
        elif hits:
            print(
                f"time to target: rllm worst seed {max(hits):.1f} s; TRL none within {args.budget_s:.0f} s "
                f"-> > {args.budget_s / max(hits):.2f}x"
            )
        tok = sum(r["tok_s"] for r in ours) / len(ours) / (sum(r["tok_s"] for r in trl) / len(trl))
        print(f"completion tokens/s: rllm / TRL = {tok:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
