"""``UnifiedTrainer``: the RL loop over any backend, synchronous or fully asynchronous.

What one training step reduces to, in both modes::

    episodes = rollouts of a batch of tasks        (workflow engine; n per task)
    postprocess_opsd(episode) for each episode     (hook plugins, concurrently, when any implement it)
    groups   = trajectory_grouping_hook(episodes)  (first result wins; default: by task and role)
    groups   = filter_groups(groups)               (uniform rewards, group size, masks)
    backend.transform_to_backend_batch -> process_backend_batch -> compute_advantages -> update_policy
    version += 1; on_policy_updated(version)       (sync: every step; async: every sync_every steps)

Sync mode generates a batch, then trains on it. Async mode runs a generation loop and a training
loop concurrently; the :class:`~rllm_core.coordinator.Coordinator` bounds staleness and pauses
and drains generation around weight syncs. Everything between "episodes" and "update" is the
same method (:meth:`UnifiedTrainer._train_on`) in both modes.

Lifecycle events go to the backend (``on_train_start(state)``...) and then to the hook plugins
the config switches on (``on_train_start(trainer)``...). ``on_policy_updated`` fires exactly once
per version change. Ctrl-C stops after the current step (a second Ctrl-C abandons it), writes a
checkpoint and closes the loggers; ``trainer.interrupted`` then tells the caller (``rllm train``
exits 130). Checkpoints are written in a thread between steps, so generation goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
import types
from pathlib import Path
from typing import Any

from rllm_core.checkpoint import (
    load_checkpoint_async,
    resolve_resume,
    rng_state,
    save_checkpoint,
    save_checkpoint_async,
)
from rllm_core.config import ConfigError, RLLMConfig, validate_plugin_sections
from rllm_core.coordinator import Coordinator, TaskResult
from rllm_core.data import TaskLoader, load_train_val
from rllm_core.loggers import Logger, MultiLogger
from rllm_core.metrics import episode_metrics, validation_metrics
from rllm_core.plugins import HookRunner, get_registry
from rllm_core.protocol import TrainerState
from rllm_core.replay import REPLAYED_KEY, SuccessReplay, fresh
from rllm_core.rows import TEMPERATURE_KEY, build_rows
from rllm_core.types import Episode, TrajectoryGroup
from rllm_core.workflows import WorkflowEngine

__all__ = ["UnifiedTrainer"]

log = logging.getLogger("rllm")


class UnifiedTrainer:
    """Trains the backend named in ``config`` with the configured workflow, reward and data.

    ``workflow``, ``reward_fn`` and ``backend`` override the config's choices (Python API, tests).
    """

    def __init__(
        self,
        config: RLLMConfig,
        *,
        workflow: Any = None,
        reward_fn: Any = None,
        backend: Any = None,
    ) -> None:
        self.config = config
        validate_plugin_sections(config)
        cfg_async = config.async_
        if config.trainer.mode == "async" and cfg_async.max_staleness < cfg_async.sync_every - 1:
            raise ConfigError(
                f"async.max_staleness: {cfg_async.max_staleness} is below sync_every - 1 = {cfg_async.sync_every - 1}; "
                "samples generated right after a sync are trained for sync_every steps before the next one"
            )
        registry = get_registry()
        self.run_dir = config.trainer.resolved_run_dir
        # Data and hooks first: a bad data path or hook setting fails before a model is built.
        train, val = load_train_val(config.data, seed=config.trainer.seed)
        self.loader = TaskLoader(
            train,
            config.data.train_batch_size,
            epochs=config.trainer.epochs,
            shuffle=config.data.shuffle,
            seed=config.trainer.seed,
        )
        self.val_tasks = val
        self.hook_plugins: dict[str, Any] = {}
        self.runner = self._build_hooks()
        if backend is None:
            backend = registry.resolve("backend", config.backend)(config)
        self.backend = backend
        backend.validate_config(config)
        if config.rollout.explore.temperature is not None and not getattr(backend, "trains_row_temperature", False):
            raise ConfigError(
                f"rollout.explore.temperature: backend {getattr(backend, 'name', type(backend).__name__)!r} trains "
                "every row at one temperature, so rollouts sampled at another would get a biased ratio; "
                "use a backend that trains each row at its own (torch), or leave it unset"
            )
        replay = config.algorithm.replay
        self.replay = SuccessReplay(replay.successes, replay.max_tasks) if replay.successes else None
        """``algorithm.replay``: the latest successes per task, replayed into all-wrong groups."""
        if self.replay is not None and not getattr(backend, "recomputes_old_logprobs", False):
            raise ConfigError(
                f"algorithm.replay.successes: backend {getattr(backend, 'name', type(backend).__name__)!r} needs "
                "the sampling logprobs of every row, and a replayed success is trained as a sample of the "
                "current policy, whose old logprobs the backend must compute; use a backend that does "
                "(torch, verl), or set it to 0"
            )
        self.engine = backend.init_rollout_engine()
        if getattr(backend, "rollout_engine", None) is None:
            backend.rollout_engine = self.engine
        self.workflow_engine = WorkflowEngine(workflow, config, self.engine, reward_fn)
        self.logger: MultiLogger = MultiLogger({})
        self.step = 0
        """Training steps done (batches consumed)."""
        self.weight_version = 0
        """Optimiser updates done: the version of the trainer's policy."""
        self.served_version = 0
        """The version the sampler serves (last ``on_policy_updated``)."""
        self.state = TrainerState()
        self.last_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        self.resumed_from: Path | None = None
        """The checkpoint this run resumed from (None for a fresh run)."""
        self.last_checkpoint: Path | None = None
        self.interrupted = False
        """Stopped by Ctrl-C (SIGINT), not by the end of the data or ``request_stop()``."""
        self._saved_step = -1
        self._validated_step = -1
        self._manual_gc = False
        """True while fit runs with Python's automatic collection off (``trainer.gc_every``)."""
        self._pending: list[tuple[int, int]] = []
        self._coord: Coordinator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = False
        self._abandon = False
        self._in_update = False
        self._epochs_started: set[int] = set()
        self._epochs_ended: set[int] = set()
        self._hook_failures_logged = 0
        cap = config.trainer.total_steps
        self.total_steps = min(cap, self.loader.total_steps) if cap else self.loader.total_steps

    # -- construction -------------------------------------------------------------------------

    def _build_hooks(self) -> HookRunner:
        runner = HookRunner()
        try:
            import rllm_core.builtins.grouping as grouping
        except ImportError:
            grouping = None
        if grouping is not None:
            runner.add("rllm.grouping", grouping)
        registry = get_registry()
        for name, settings in self.config.hooks.items():
            obj = registry.resolve("hook", name)
            if isinstance(obj, types.ModuleType):
                plugin = obj
            else:
                try:
                    plugin = obj(dict(settings or {}))
                except Exception as exc:
                    raise ConfigError(f"hooks.{name}: could not be created: {type(exc).__name__}: {exc}") from exc
            runner.add(name, plugin)
            self.hook_plugins[name] = plugin
        return runner

    def _build_loggers(self) -> MultiLogger:
        registry = get_registry()
        loggers: dict[str, Logger] = {}
        for name, settings in self.config.loggers.items():
            try:
                cls = registry.resolve("logger", name)
                loggers[name] = cls(dict(settings or {}), run_dir=self.run_dir, config=self.config)
            except Exception as exc:
                log.warning("logger %r could not be created (%s: %s); it is disabled", name, type(exc).__name__, exc)
        return MultiLogger(loggers)

    # -- entry points -------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to the end (sync entry point); returns the last step's metrics."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # run outside the except block: the caught error would be every later error's context
        else:
            raise RuntimeError("fit() called inside a running event loop; use `await trainer.fit_async()`")
        return asyncio.run(self.fit_async())

    def request_stop(self) -> None:
        """Stop after the current step (what Ctrl-C does); plugins may call it too, from any thread.

        In async mode a training loop waiting for episodes or for a drain stops waiting at once.
        """
        self._stop_requested = True
        coord, loop = self._coord, self._loop
        if coord is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(coord.request_stop)
            except RuntimeError:  # the loop closed meanwhile: nothing is waiting any more
                pass

    async def fit_async(self) -> dict[str, float]:
        """Train to the end; returns the last step's metrics."""
        # Everything alive now (modules, model, config, data) lives through the run; freezing it
        # keeps the garbage collector's full passes, which each step's ~10^4 new episode objects
        # trigger, from re-scanning it (35% of a zero-latency step here). Unfrozen at the end, so
        # nothing is kept beyond the run; a process that froze objects itself is left alone.
        freeze = gc.isenabled() and gc.get_freeze_count() == 0
        # trainer.gc_every: no automatic passes, which each re-walk the live episodes; _after_step
        # collects between steps instead. A process that turned the collector off is left alone.
        self._manual_gc = gc.isenabled() and self.config.trainer.gc_every > 0
        if freeze:
            gc.freeze()
        if self._manual_gc:
            gc.disable()
        try:
            return await self._fit()
        finally:
            if self._manual_gc:
                gc.enable()
                self._manual_gc = False
            if freeze:
                gc.unfreeze()

    async def _fit(self) -> dict[str, float]:
        self._loop = asyncio.get_running_loop()
        self._open_run()
        await self._maybe_resume()
        main_task = asyncio.current_task()
        restore_signal = self._install_sigint(main_task)
        state = self._new_state()
        crashed = False
        try:
            await self.backend.on_train_start(state)
            await self.runner.call("on_train_start", trainer=self)
            # Resumed between weight syncs (sync_every > 1): the sampler must serve the loaded weights.
            await self._publish(state)
            if self.config.trainer.val_before_train and self.val_tasks and self.step == 0:
                await self.validate()
            if self.config.trainer.mode == "async":
                await self._fit_async_mode()
            else:
                await self._fit_sync_mode()
            if (
                self.config.trainer.val_at_end
                and self.val_tasks
                and not self._stop_requested
                and self._validated_step != self.step  # val_every may just have validated this step
            ):
                await self.validate()
        except asyncio.CancelledError:
            if not self._abandon:
                raise
            log.warning("training step abandoned on request")
        except BaseException:
            crashed = True
            raise
        finally:
            restore_signal()
            await self._close(crashed)
        return self.last_metrics

    async def _close(self, crashed: bool) -> None:
        try:
            if not crashed and not self._in_update and self.step > self._saved_step and self.step > 0:
                await self._save_checkpoint()
            state = self._new_state()
            await self.backend.on_train_end(state)
            await self.runner.call("on_train_end", trainer=self)
        finally:
            self.logger.close()
            self.workflow_engine.close()
            await self.backend.shutdown()

    def _open_run(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = self.config.to_dict()
        try:
            from omegaconf import OmegaConf

            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved), encoding="utf-8")
        except Exception as exc:
            log.warning("could not write %s/config.yaml: %s", self.run_dir, exc)
        self.logger = self._build_loggers()
        self.logger.log_config(resolved)

    def _install_sigint(self, main_task: asyncio.Task | None):
        if threading.current_thread() is not threading.main_thread() or main_task is None:
            return lambda: None
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            self.interrupted = True
            if not self._stop_requested:
                self.request_stop()
                log.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abandon it)")
            else:
                self._abandon = True
                main_task.cancel()

        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        except (NotImplementedError, RuntimeError, ValueError):
            return lambda: None

        def restore() -> None:
            try:
                loop.remove_signal_handler(signal.SIGINT)
            except (NotImplementedError, RuntimeError, ValueError):
                pass

        return restore

    # -- checkpoints --------------------------------------------------------------------------

    async def _maybe_resume(self) -> None:
        path = resolve_resume(self.config.trainer.resume, self.run_dir)
        if path is None:
            return
        st = await load_checkpoint_async(path, self.backend)
        self.step = int(st["step"])
        # The backend loaded the trainer's weights (weight_version); the sampler may have served
        # an older version at the save (sync_every > 1). _fit pushes the loaded weights to it.
        # Checkpoints from before served_version was recorded hold the served version only.
        self.weight_version = int(st["weight_version"])
        self.served_version = int(st.get("served_version", self.weight_version))
        self.loader.load_state_dict(st["data"])
        self._pending = [tuple(k) for k in st.get("pending", [])]
        self._epochs_started = set(st.get("epochs_started", []))
        self.workflow_engine.explore_tasks = set(st.get("explore_tasks", []))
        if self.replay is not None:
            self.replay.load_state_dict(st.get("replay", []))
        if "epochs_ended" in st:
            self._epochs_ended = set(st["epochs_ended"])
        else:  # an older checkpoint: the epochs left behind with nothing pending had ended
            pending_epochs = {epoch for epoch, _ in self._pending}
            self._epochs_ended = {e for e in self._epochs_started if e < self.loader.epoch and e not in pending_epochs}
        self.engine.set_weight_version(self.served_version)
        self._saved_step = self.step
        self.resumed_from = path
        log.info("resumed from %s at step %d", path, self.step)
        # What the interrupted run logged after this step is redone: loggers drop it.
        self.logger.on_resume(self.step, path)

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step now (atomic; blocks until written)."""
        trainer_state, rng = self._checkpoint_state()
        path = save_checkpoint(
            self.run_dir, self.step, trainer_state, self.backend, keep=self.config.trainer.keep_checkpoints, rng=rng
        )
        self.last_checkpoint, self._saved_step = path, trainer_state["step"]
        return path

    async def _save_checkpoint(self) -> Path:
        # The files are written in threads (and a backend's async save awaited), so async
        # generation goes on; the training loop awaits it, so no update runs while the backend
        # saves. The state is taken here, on the loop, so the loader position and the pending
        # tasks agree.
        trainer_state, rng = self._checkpoint_state()
        path = await save_checkpoint_async(
            self.run_dir, self.step, trainer_state, self.backend, keep=self.config.trainer.keep_checkpoints, rng=rng
        )
        self.last_checkpoint, self._saved_step = path, trainer_state["step"]
        return path

    def _checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        pending = self._coord.pending_keys() if self._coord is not None else self._pending
        trainer_state = {
            "step": self.step,
            "weight_version": self.weight_version,
            "served_version": self.served_version,
            "epoch": self.loader.epoch,
            "data": self.loader.state_dict(),
            "pending": [list(k) for k in pending],
            "epochs_started": sorted(self._epochs_started),
            "epochs_ended": sorted(self._epochs_ended),
            "explore_tasks": sorted(self.workflow_engine.explore_tasks),
            "replay": self.replay.state_dict() if self.replay is not None else [],
            "time": time.time(),
            "config": self.config.to_dict(),
        }
        return trainer_state, rng_state()

    # -- shared step machinery ----------------------------------------------------------------

    def _new_state(self, **fields: Any) -> TrainerState:
        fields.setdefault("step", self.step)
        fields.setdefault("epoch", self.loader.epoch)
        fields.setdefault("weight_version", self.served_version)
        return TrainerState(**fields)

    async def _epoch_start(self, epoch: int) -> None:
        if epoch in self._epochs_started:
            return
        self._epochs_started.add(epoch)
        await self.backend.on_epoch_start(self._new_state(epoch=epoch))
        await self.runner.call("on_epoch_start", trainer=self, epoch=epoch)

    async def _epoch_end(self, epoch: int) -> None:
        if epoch in self._epochs_ended:
            return
        self._epochs_ended.add(epoch)
        await self.backend.on_epoch_end(self._new_state(epoch=epoch))
        await self.runner.call("on_epoch_end", trainer=self, epoch=epoch)

    async def _batch_start(self, state: TrainerState) -> None:
        self.state = state
        await self.backend.on_batch_start(state)
        await self.runner.call("on_batch_start", trainer=self, step=self.step)

    async def group_episodes(self, episodes: list[Episode]) -> list[TrajectoryGroup]:
        """Group through ``trajectory_grouping_hook`` (the built-in groups by task and role)."""
        groups = await self.runner.call_first("trajectory_grouping_hook", episodes=episodes, config=self.config)
        if groups is None:
            from rllm_core.grouping import group_episodes

            groups = group_episodes(episodes)
        return list(groups)

    async def _train_on(
        self, state: TrainerState, episodes: list[Episode], generated: list[Episode] | None = None
    ) -> dict[str, float]:
        """Everything from episodes to the optimiser step: the same code in sync and async mode.

        ``generated``: every episode generated for the step when it is more than those trained on
        (dynamic sampling); the ``train/`` episode metrics are over it, so they describe the policy.
        """
        from rllm_core.advantages import filter_groups

        replayed = 0
        if self.replay is not None:
            # What the policy generated, not the copies a step before this one put in.
            self.replay.observe(fresh(episodes if generated is None else generated))
            episodes = self.replay.fill_all(episodes)  # dynamic sampling has filled its groups already
            replayed = sum(1 for e in episodes if e.info.get(REPLAYED_KEY))
        state.episodes = episodes
        if self.runner.has("postprocess_opsd"):
            await asyncio.gather(
                *(
                    self.runner.call("postprocess_opsd", episode=e, engine=self.engine, config=self.config)
                    for e in episodes
                )
            )
        # after post-processing: it may add episode metrics
        seen = episodes if generated is None else generated
        if self.replay is not None:
            seen = fresh(seen)
        metrics = episode_metrics(seen, "train")
        if self.replay is not None:
            metrics["replay/episodes"] = float(replayed)
            metrics["replay/tasks"] = float(len(self.replay))
        if self.config.rollout.explore.temperature is not None:
            self._update_explore(seen, metrics)
        groups = await self.group_episodes(episodes)
        groups, filter_metrics = filter_groups(groups, self.config.algorithm.filter)
        metrics.update(filter_metrics)
        state.groups = groups
        metrics["train/groups/count"] = float(len(groups))
        staleness = [
            self.weight_version - s.weight_version
            for g in groups
            for t in g.trajectories
            for s in t.steps
            if s.weight_version is not None
        ]
        if staleness:
            metrics["async/staleness/min"] = float(min(staleness))
            metrics["async/staleness/mean"] = sum(staleness) / len(staleness)
            metrics["async/staleness/max"] = float(max(staleness))
        if groups:
            # The one transform every backend trains through (off the loop: it walks every token).
            state.rows = await asyncio.to_thread(
                build_rows, groups, mask_reasons=self.config.algorithm.filter.mask_termination_reasons
            )
            metrics.update(state.rows.metrics)
        if not groups or not len(state.rows):
            metrics["train/skipped_updates"] = 1.0
            return metrics
        start = time.perf_counter()
        self._in_update = True
        state.backend_batch = await self.backend.transform_to_backend_batch(state)
        await self.backend.process_backend_batch(state)
        await self.backend.compute_advantages(state, self.config.algorithm)
        state.rows.fill_advantages()
        await self.backend.update_policy(state)
        self.weight_version += 1
        self._in_update = False
        metrics["time/train"] = time.perf_counter() - start
        metrics["train/skipped_updates"] = 0.0
        metrics.update(state.metrics)
        return metrics

    def _update_explore(self, episodes: list[Episode], metrics: dict[str, float]) -> None:
        """``rollout.explore``: a task joins the tempered set when none of its rollouts here is
        correct (once the step's rollouts are ``after_correct`` correct), and leaves it when one is."""
        solved: dict[str, bool] = {}
        correct = tempered = 0
        for episode in episodes:
            ok = bool(episode.is_correct)
            solved[episode.task_id] = solved.get(episode.task_id, False) or ok
            correct += ok
            tempered += TEMPERATURE_KEY in episode.info
        tasks = self.workflow_engine.explore_tasks
        gate = bool(episodes) and correct / len(episodes) >= self.config.rollout.explore.after_correct
        for task_id, ok in solved.items():
            if ok:
                tasks.discard(task_id)
            elif gate:
                tasks.add(task_id)
        metrics["explore/episodes"] = float(tempered)
        metrics["explore/tasks"] = float(len(tasks))

    async def _publish(self, state: TrainerState) -> None:
        """Tell the backend and the hook plugins that the policy version changed (once per version)."""
        version = self.weight_version
        if version == self.served_version:
            return
        await self.backend.on_policy_updated(state, version)
        if self.engine.weight_version != version:
            # Staleness accounting relies on outputs being stamped with the served version.
            self.engine.set_weight_version(version)
        self.served_version = version
        state.weight_version = version
        await self.runner.call("on_policy_updated", trainer=self, version=version)

    async def _finish_step(self, state: TrainerState, metrics: dict[str, float], step_start: float) -> None:
        step_time = time.perf_counter() - step_start
        metrics["time/step"] = step_time
        tokens = metrics.get("train/tokens/response_sum", 0.0)
        metrics["throughput/tokens_per_s"] = tokens / step_time if step_time > 0 else 0.0
        for key, value in self.workflow_engine.pop_counters().items():
            metrics[key] = value
        metrics["trainer/step"] = float(self.step)
        metrics["trainer/epoch"] = float(state.epoch)
        metrics["trainer/weight_version"] = float(self.weight_version)
        metrics["trainer/served_version"] = float(self.served_version)
        metrics["trainer/total_steps"] = float(self.total_steps)
        hook_failures = sum(self.runner.failures.values())
        metrics["hooks/failures"] = float(hook_failures - self._hook_failures_logged)  # since the last step
        self._hook_failures_logged = hook_failures
        metrics["loggers/failures"] = float(sum(self.logger.failures.values()))
        state.metrics = metrics
        self.last_metrics = metrics
        self.logger.log_metrics(self.step, metrics)
        n_log = self.config.trainer.log_episodes
        if n_log:
            self.logger.log_episodes(self.step, state.episodes[:n_log])
        await self.backend.on_batch_end(state)
        await self.runner.call("on_batch_end", trainer=self, metrics=metrics)

    async def _after_step(self) -> None:
        cfg = self.config.trainer
        if cfg.val_every and self.val_tasks and self.step % cfg.val_every == 0:
            await self.validate()
        if cfg.save_every and self.step % cfg.save_every == 0:
            await self._save_checkpoint()
        if self._manual_gc and self.step % cfg.gc_every == 0:
            gc.collect()

    def _should_stop(self) -> bool:
        return self._stop_requested or self.step >= self.total_steps

    async def validate(self) -> dict[str, float]:
        """Run the validation tasks (``rollout.n_val`` each) and log pass@k; returns the metrics."""
        start = time.perf_counter()
        self._validated_step = self.step
        state = self._new_state(is_validation=True, batch=self.val_tasks)
        await self.backend.on_validation_start(state)
        await self.runner.call("on_validation_start", trainer=self)
        size = self.config.data.val_batch_size or len(self.val_tasks) or 1
        episodes: list[Episode] = []
        for i in range(0, len(self.val_tasks), size):
            chunk = self.val_tasks[i : i + size]
            episodes.extend(await self.backend.generate_episodes(chunk, self.workflow_engine, is_validation=True))
        state.episodes = episodes
        metrics = validation_metrics(episodes, self.config.rollout.n_val, self.config.data.data_source_key)
        metrics["val/time"] = time.perf_counter() - start
        state.metrics = metrics
        self.val_metrics = metrics
        await self.backend.on_validation_end(state)
        await self.runner.call("on_validation_end", trainer=self, metrics=metrics)
        self.logger.log_metrics(self.step, metrics)
        return metrics

    # -- sync mode ----------------------------------------------------------------------------

    async def _fit_sync_mode(self) -> None:
        while not self._should_stop():
            before = self.loader.state_dict()
            item = self.loader.next_batch()
            if item is None:
                break
            epoch, batch = item
            await self._epoch_start(epoch)
            try:
                await self._sync_step(epoch, batch)
            except asyncio.CancelledError:
                if not self._in_update:
                    self.loader.load_state_dict(before)  # the abandoned batch is redone on resume
                raise
            for started in sorted(self._epochs_started - self._epochs_ended):
                if started < self.loader.epoch or self.loader.finished:  # dynamic sampling may draw ahead
                    await self._epoch_end(started)
            await self._after_step()

    async def _sync_step(self, epoch: int, batch: list[dict[str, Any]]) -> None:
        step_start = time.perf_counter()
        state = self._new_state(epoch=epoch, batch=batch)
        await self._batch_start(state)
        episodes = await self.backend.generate_episodes(batch, self.workflow_engine, is_validation=False)
        generated, extra = episodes, {}
        if self.config.algorithm.filter.dynamic_sampling:
            episodes, generated, extra = await self._sample_dynamically(episodes)
        gen_time = time.perf_counter() - step_start
        metrics = await self._train_on(state, episodes, generated)
        metrics.update(extra)
        self.step += 1
        await self._publish(state)
        busy_train = metrics.get("time/train", 0.0)
        total = time.perf_counter() - step_start
        metrics["time/generate"] = gen_time
        metrics["timing/gen_idle_frac"] = 1.0 - gen_time / total if total > 0 else 0.0
        metrics["timing/train_idle_frac"] = 1.0 - busy_train / total if total > 0 else 0.0
        await self._finish_step(state, metrics, step_start)

    async def _sample_dynamically(
        self, episodes: list[Episode]
    ) -> tuple[list[Episode], list[Episode], dict[str, float]]:
        """DAPO's dynamic sampling (sync mode): replace uninformative tasks with new ones.

        Returns the episodes of the first ``train_batch_size`` informative tasks, everything
        generated (for the train metrics) and the ``dynamic/*`` metrics.
        """
        from rllm_core.advantages import is_informative

        target = self.config.data.train_batch_size
        flt = self.config.algorithm.filter
        max_rounds = flt.max_sample_rounds
        generated = list(episodes)
        kept: dict[str, list[Episode]] = {}
        rounds = tasks = 0
        while True:
            rounds += 1
            by_task: dict[str, list[Episode]] = {}
            for episode in episodes:
                by_task.setdefault(episode.task_id, []).append(episode)
            tasks += len(by_task)
            if self.replay is not None:
                self.replay.observe(episodes)
            for task_id, eps in by_task.items():
                # a small data set can come round again: one group per task in a step
                if task_id in kept:
                    continue
                if self.replay is not None:
                    eps = self.replay.fill(eps)  # before the check: a replayed success makes it informative
                if is_informative(eps):
                    kept[task_id] = eps
            if len(kept) >= target or rounds >= max_rounds:
                break
            item = self.loader.next_batch()
            if item is None:
                break
            await self._epoch_start(item[0])
            episodes = await self.backend.generate_episodes(item[1], self.workflow_engine, is_validation=False)
            generated.extend(episodes)
        metrics = {
            "dynamic/rounds": float(rounds),
            "dynamic/tasks_generated": float(tasks),
            "dynamic/informative_tasks": float(len(kept)),
            "dynamic/surplus_tasks": float(max(0, len(kept) - target)),
        }
        chosen = list(kept.values())[:target]
        out = [e for eps in chosen for e in eps]
        if flt.anchor_collapsed:
            out.extend(self._anchors({eps[0].task_id for eps in chosen}, generated, metrics))
        return out, generated, metrics

    def _anchors(self, chosen: set[str], candidates: list[Episode], metrics: dict[str, float]) -> list[Episode]:
        """``filter.anchor_collapsed``: the episodes of up to that many collapsed tasks among
        ``candidates`` outside ``chosen`` (a task generated twice in the step pools its rollouts),
        marked to be trained with advantage 0, for the terms that pull toward the reference."""
        from rllm_core.advantages import ANCHOR_KEY, is_collapsed

        flt = self.config.algorithm.filter
        pooled: dict[str, list[Episode]] = {}
        for episode in candidates:
            if episode.task_id not in chosen:
                pooled.setdefault(episode.task_id, []).append(episode)
        anchors = [eps for eps in pooled.values() if is_collapsed(eps, flt.collapse_share)]
        anchors = anchors[: flt.anchor_collapsed]
        out = []
        for eps in anchors:
            for episode in eps:
                for trajectory in episode.trajectories:
                    trajectory.info[ANCHOR_KEY] = True
            out.extend(eps)
        metrics["dynamic/anchored_tasks"] = float(len(anchors))
        return out

    # -- async mode ---------------------------------------------------------------------------

    async def _generation_loop(self, coord: Coordinator) -> None:
        running: set[asyncio.Task] = set()

        async def run_one(key: tuple[int, int], task: dict[str, Any]) -> None:
            try:
                episodes = await self.backend.generate_episodes([task], self.workflow_engine, is_validation=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.config.workflow.raise_on_error:
                    await coord.fail(exc)  # the training loop raises it, as sync mode would
                    return
                log.warning("generate_episodes failed for task %s: %r", task.get(self.config.data.id_key), exc)
                await coord.give_back(key, failed=True)
                return
            await coord.complete(TaskResult(key[0], key[1], episodes))

        try:
            while True:
                key = coord.next_todo()  # given back, or pending in the checkpoint: before new tasks
                if key is None:
                    nxt = self.loader.next_task()
                    if nxt is None:
                        if await coord.wait_for_todo():
                            continue
                        break
                    key = nxt[:2]
                    coord.hold(key)
                await self._epoch_start(key[0])
                if not await coord.admit(key):
                    break  # stopping
                t = asyncio.create_task(run_one(key, self.loader.task_at(*key)))
                running.add(t)
                t.add_done_callback(running.discard)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await coord.fail(exc)  # e.g. a backend's on_epoch_start raised: training must not wait on
            raise
        finally:
            for t in list(running):
                t.cancel()
            await coord.finish_generation()

    async def _fit_async_mode(self) -> None:
        cfg = self.config.async_
        batch_size = self.config.data.train_batch_size
        coord = Coordinator(
            batch_size,
            cfg.max_staleness,
            cfg.sync_every,
            cfg.partial_rollout,
            start_step=self.step,
            max_requeues=cfg.max_requeues,
            todo=self._pending,
        )
        self._coord = coord
        gen_task = asyncio.create_task(self._generation_loop(coord))
        last_end = time.perf_counter()
        last_gen_busy = 0.0
        from rllm_core.advantages import is_informative

        keep, max_discards = None, 0
        if self.config.algorithm.filter.dynamic_sampling:

            def keep(result: TaskResult) -> bool:
                if self.replay is not None:
                    self.replay.observe(result.episodes)
                    result.episodes = self.replay.fill(result.episodes)
                return is_informative(result.episodes)

            max_discards = (self.config.algorithm.filter.max_sample_rounds - 1) * batch_size
        try:
            while not self._should_stop():
                wait_start = time.perf_counter()
                results = await coord.take(self.weight_version, keep, max_discards)
                waited = time.perf_counter() - wait_start
                if not results:
                    break
                step_start = time.perf_counter()
                episodes = [e for r in results for e in r.episodes]
                discarded = [e for r in coord.discarded for e in r.episodes]
                generated = episodes + discarded if discarded else None
                anchored: dict[str, float] = {}
                if self.config.algorithm.filter.anchor_collapsed:
                    # As in sync mode, from everything the step generated outside its informative
                    # tasks: what it discarded and, once the discard budget ran out, what it took.
                    informative = {r.episodes[0].task_id for r in results if is_informative(r.episodes)}
                    taken = {id(e) for e in episodes}
                    anchors = self._anchors(informative, generated or episodes, anchored)
                    episodes += [e for e in anchors if id(e) not in taken]  # the discarded ones
                epoch = min(r.epoch for r in results)
                batch = [r.episodes[0].task if r.episodes else None for r in results]
                state = self._new_state(epoch=epoch, batch=batch)
                await self._batch_start(state)
                metrics = await self._train_on(state, episodes, generated)
                metrics.update(anchored)
                self.step += 1
                drain = 0.0
                if self.step - coord.synced_step >= cfg.sync_every:
                    drain = await self._sync(coord, state)
                now = time.perf_counter()
                interval = now - last_end
                gen_busy = coord.gen_busy_time()
                metrics["time/generate"] = gen_busy - last_gen_busy
                metrics["time/wait_for_episodes"] = waited
                metrics["time/drain"] = drain
                metrics["timing/gen_idle_frac"] = (
                    max(0.0, 1.0 - (gen_busy - last_gen_busy) / interval) if interval else 0.0
                )
                metrics["timing/train_idle_frac"] = min(1.0, (waited + drain) / interval) if interval else 0.0
                metrics.update(coord.pop_counters())
                metrics["async/queued"] = float(len(coord.queue))
                metrics["async/in_flight"] = float(len(coord.in_flight))
                last_end, last_gen_busy = now, gen_busy
                await self._finish_step(state, metrics, step_start - waited)
                await self._end_settled_epochs(coord)
                await self._after_step()
            if not self._should_stop():
                await self._end_settled_epochs(coord)  # the last tasks may have been given up
        finally:
            gen_task.cancel()
            await asyncio.gather(gen_task, return_exceptions=True)
            self._pending = coord.pending_keys() if self._should_stop() else []
            self._coord = None
        # Generation is over, so nothing needs draining: push the last update directly.
        await self._publish(self._new_state())

    async def _end_settled_epochs(self, coord: Coordinator) -> None:
        """``on_epoch_end`` once every task of the epoch was handed out and trained on (or given up)."""
        unsettled = {epoch for epoch, _ in coord.pending_keys()}
        for epoch in sorted(self._epochs_started - self._epochs_ended):
            if epoch < self.loader.epoch and epoch not in unsettled:
                await self._epoch_end(epoch)

    async def _sync(self, coord: Coordinator, state: TrainerState) -> float:
        if self.weight_version == self.served_version:
            await coord.mark_synced(self.step)  # nothing to push (no update since the last sync)
            return 0.0
        return await coord.sync(self.step, lambda: self._publish(state))
