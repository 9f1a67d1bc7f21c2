"""Local torch backend vs TRL's GRPOTrainer: same tiny model, task, batch, group size and steps, CPU.

    bash benchmarks/local_vs_trl/run.sh             # creates benchmarks/.trl-venv (trl)
    python bench.py --steps 60 --tasks 32 --group 8  # inside that venv

Each side runs in its own subprocess (clean peak-memory numbers). Both train the same tiny Qwen2
(built from the same seed and settings by rllm-torch's builder), on the arith task (``a+b=``,
answer one token then end-of-turn, reward 1 / 0.5 / 0), with GRPO advantages, no KL, lr, batch
and group size equal, and print seconds per step, completion tokens per second, peak RSS and
the final reward (mean train reward over the last 5 steps), then the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "../../examples/arith/config_one_token.yaml")


def _tiny_settings() -> dict:
    """The example's tiny model settings (both sides build exactly this model)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONFIG).torch.tiny)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_rllm(args: argparse.Namespace) -> dict:
    from rllm_core import UnifiedTrainer, load_config

    history: list[dict] = []

    class Rec:
        def __init__(self, *a, **k):
            pass

        def log_config(self, c):
            pass

        def log_metrics(self, step, m):
            if "train/reward/mean" in m:
                history.append(dict(m))

        def log_episodes(self, *a):
            pass

        def close(self):
            pass

    sys.modules["__bench_rec__"] = type(sys)("__bench_rec__")
    sys.modules["__bench_rec__"].Rec = Rec
    config = load_config(
        CONFIG,
        overrides=[
            # what TRL's GRPOTrainer does too: constant lr, no entropy bonus
            "algorithm.optim.schedule=constant",
            "torch.entropy_coef=0.0",
            f"data.train_batch_size={args.tasks}",
            f"rollout.n={args.group}",
            f"rollout.train_sampling.max_tokens={args.max_tokens}",
            f"trainer.total_steps={args.steps}",
            "trainer.val_every=0",
            "trainer.val_at_end=false",
            f"trainer.run_dir={args.out}/rllm_run",
            f"algorithm.optim.lr={args.lr}",
            f"trainer.seed={args.seed}",
            f"torch.num_threads={args.threads}",
            # TRL generates the whole batch at once; here too: every episode in flight, one sampler batch
            f"workflow.max_concurrency={args.tasks * args.group}",
            f"torch.gen_max_batch={args.tasks * args.group}",
            *args.rllm_override,
        ],
    )
    config.trainer.resume = "off"
    config.loggers = {"__bench_rec__:Rec": {}}
    trainer = UnifiedTrainer(config)
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    tokens = sum(m.get("train/tokens/response_sum", 0.0) for m in history)
    rewards = [m["train/reward/mean"] for m in history]
    return {"wall_s": wall, "steps": len(rewards), "completion_tokens": tokens, "rewards": rewards}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from rllm_torch.config import TinyModelSettings
    from rllm_torch.model import build_tiny_model, build_tiny_tokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    tiny = TinyModelSettings(**_tiny_settings())
    tok = build_tiny_tokenizer(tiny.vocab)
    torch.manual_seed(args.seed)
    model = build_tiny_model(tiny, len(tok), tok.pad_token_id, tok.eos_token_id)
    tasks = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": a + b} for a in range(10) for b in range(10)
    ]
    ds = Dataset.from_list(tasks * 200)
    stats = {"tokens": 0, "rewards": []}
    eos = tok.eos_token_id

    def reward(completions, answer, completion_ids, **kw):
        out = []
        for ids, ans in zip(completion_ids, answer, strict=False):
            ids = list(ids)
            stats["tokens"] += len(ids)  # end-of-turn included, as on the rllm side
            if ids and ids[-1] == eos:
                ids = ids[:-1]
            words = tok.convert_ids_to_tokens(ids)
            out.append(1.0 if words == [str(ans)] else 0.5 if words and words[0] == str(ans) else 0.0)
        stats["rewards"].append(sum(out) / len(out))
        return out

    cfg = GRPOConfig(
        output_dir=f"{args.out}/trl_run",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=args.tasks * args.group,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.max_tokens,
        temperature=1.0,
        beta=0.0,
        loss_type="grpo",
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "steps": args.steps, "completion_tokens": stats["tokens"], "rewards": stats["rewards"]}


def child(args: argparse.Namespace) -> None:
    result = run_rllm(args) if args.impl == "rllm" else run_trl(args)
    result["peak_mb"] = _peak_mb()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--tasks", type=int, default=50, help="prompts per step")
    p.add_argument("--group", type=int, default=16, help="completions per prompt")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--impl", choices=["rllm", "trl", "both"], default="both")
    p.add_argument(
        "--rllm-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for the rllm side (repeatable), e.g. torch.share_prompt_prefix=false",
    )
    args = p.parse_args()
    if args.impl != "both":
        child(args)
        return
    results = {}
    for impl in ("rllm", "trl"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{impl} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            sys.exit(1)
        results[impl] = json.loads(line[7:])
    print(
        f"\nsetup: {args.steps} steps, {args.tasks} prompts x {args.group} completions, max {args.max_tokens} tokens, "
        f"lr {args.lr}, {args.threads} torch threads, CPU"
    )
    print(f"{'':8}{'s/step':>10}{'compl tok/s':>14}{'peak MB':>10}{'final reward':>14}")
    for impl, r in results.items():
        r["s_per_step"] = r["wall_s"] / max(1, r["steps"])
        r["tok_s"] = r["completion_tokens"] / r["wall_s"]
        r["final"] = sum(r["rewards"][-5:]) / max(1, len(r["rewards"][-5:]))
        print(f"{impl:8}{r['s_per_step']:>10.3f}{r['tok_s']:>14.1f}{r['peak_mb']:>10.0f}{r['final']:>14.3f}")
    ratio = results["rllm"]["tok_s"] / results["trl"]["tok_s"]
    print(
        f"\nthroughput ratio rllm/trl: {ratio:.2f}x (target >= 1.5x); "
        f"final reward rllm {results['rllm']['final']:.3f} vs trl {results['trl']['final']:.3f}"
    )


if __name__ == "__main__":
    main()
