"""The training loop. It stays short and never names a technique: techniques act through hooks.

One optimizer step = ``accumulation`` micro-batches. The loss of a step is the mean over every
target token of all its micro-batches, so accumulating k micro-batches is exactly one k-times
larger batch (up to float rounding) even when micro-batches hold different numbers of targets.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..budget import Budget, Clock, exhausted, is_due, next_due, progress
from ..distributed.parallel import Parallel, whole
from ..errors import ConfigError, Terminated
from ..objectives import target_index
from ..optim import evaluation_weights
from ..schedules import lr_factor, ramp_accumulation
from .device import autocast, memory_gb
from .nonfinite import NonfiniteCounter, advice, skips_on_device, step_unless
from .state import TrainState

Batch = dict[str, torch.Tensor]


def in_ms(seconds: float) -> float:
    """Seconds cut, not rounded, to milliseconds for the log: a record never shows a time budget
    as reached (1.9996 s as 2.0) at a step before the one that reached it."""
    # Rounded to nanoseconds first: 1.001 * 1000 is 1000.9999999999999 in floating point.
    return math.floor(round(seconds * 1000, 6)) / 1000


class Trainer:
    """Runs optimizer steps until the budget is spent.

    The pieces are built by :mod:`cramkit.train.run`; the trainer only orders them:
    ``on_step_start → on_batch → forward/backward → on_after_backward → step → on_step_end``.
    """

    def __init__(
        self,
        *,
        cfg,
        model: torch.nn.Module,
        optimizer_factory: Callable[[torch.nn.Module], torch.optim.Optimizer],
        train_batches: Iterator[Batch],
        evaluate: Callable[[torch.nn.Module], float],
        checkpoint: Callable[[TrainState], None],
        log: Callable[[dict[str, Any]], None],
        techniques: list,
        device: torch.device,
        precision: str,
        micro_batch: int,
        seq_len: int,
        flops_per_token: Callable[[torch.nn.Module], float],
        peak_flops: float,
        state: TrainState | None = None,
        clock: Clock | None = None,
        prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
        progress_bar=None,
        parallel=None,
        offload=None,
        ramp_unit: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.budget = Budget.parse(cfg.train.budget)
        self.state = state or TrainState()
        self.clock = clock or Clock()
        self.techniques = techniques
        self.device, self.precision = device, precision
        self.micro_batch, self.seq_len = micro_batch, seq_len
        # Each rank's share of the step the batch ramp grows by: the micro-batch the run started
        # with, kept when a resume changes the micro-batch (each step keeps its batch).
        self.ramp_unit = ramp_unit or micro_batch
        self.batches = train_batches
        self.evaluate, self.checkpoint, self.log = evaluate, checkpoint, log
        self.optimizer_factory = optimizer_factory
        self.flops_per_token_fn = flops_per_token
        self.peak_flops = peak_flops
        self._mfu_warned = False
        self.prepare_model = prepare_model
        self.par = parallel or Parallel()
        self.offload = offload or contextlib.nullcontext
        self.bar = progress_bar
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.stop_reason: str | None = None
        self._signalled = False  # set by the signal handler, agreed across ranks per step
        self.nonfinite = NonfiniteCounter(cfg.train.max_nonfinite, advice(cfg.train.clip_grad, precision))
        self.passes = 1  # forward/backward passes of the latest step (train_step counts them)
        self._loss: torch.Tensor | None = None  # the last step's, read on the host when logged
        self._adopt(model, self.state.optimizer)
        self.state.usage.seconds = self.clock.elapsed

    # ------------------------------------------------------------------ model and optimizer
    def _adopt(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.raw_model = model
        # Compilation warm-up is not training time, also when a technique swaps the model mid-run.
        with self.clock.paused():
            self.model = self.prepare_model(model)  # checkpointing → compile → sharding
        self.state.model = model
        self.state.optimizer = optimizer or self.optimizer_factory(model)
        self._fpt = self.flops_per_token_fn(model)

    def _swap_model_if_requested(self) -> None:
        if self.state.pending_model is None:
            return
        if self.state.last_step and self.par.is_main:
            # A (plugin) technique that ignores last_step. Failing here would cost the user the
            # final checkpoint of a finished run, and dropping the request would leave the
            # technique's state describing a model that was never built (a resume would build
            # it): the swap goes through, and the technique's author learns what it costs.
            warnings.warn("a technique asked for a new model (state.request_model) after the step that spends "
                          "the budget: nothing trains it, yet the final evaluation, checkpoint and summary "
                          "describe it; a technique's on_step_end should leave the model alone when "
                          "state.last_step is set", stacklevel=2)
        new_model, transfer = self.state.pending_model
        self.state.pending_model = None
        old_model, old_opt = self.raw_model, self.state.optimizer
        # Every technique's surgery applies to the new model as it did to the first one.
        for t in self.techniques:
            new_model = t.on_model(new_model)
        self._adopt(new_model.to(self.device), None)
        if transfer is not None:
            transfer(old_model, new_model, old_opt, self.state.optimizer)

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: list[Batch]) -> torch.Tensor:
        """Forward/backward over ``batches`` as one batch, then one optimizer step.

        Returns the step's loss (mean over all target tokens) as a 0-d tensor. A non-finite loss
        skips the update and is counted; too many in a row stop training with a clear error. An
        optimizer with ``needs_closure`` (SAM) gets ``step(closure)``: the closure zeroes the
        gradients and repeats forward/backward, hooks and clipping over the same micro-batches;
        a non-finite loss of that second pass is a skipped step too (the optimizer left the
        weights as they were, see :mod:`cramkit.optim`).

        When the optimizer can skip a step from a device flag (:mod:`.nonfinite`), nothing here
        waits for the device: the loss stays there and the counts are read at the next log or
        checkpoint. Otherwise the loss is read on the host to decide.
        """
        state, optimizer, par = self.state, self.state.optimizer, self.par
        self.passes = 0  # forward/backward passes over the batch this step: each costs its FLOPs
        batches = [locate_targets(b, self.raw_model) for b in batches]
        # Labels are still on the CPU (the copy happens per micro-batch below): no device wait.
        local_targets = sum(int((b["labels"] != -100).sum()) for b in batches)
        total_targets = max(par.all_sum([local_targets])[0], 1)  # over all micro-batches and ranks
        loss_sum = self._clip(self._forward_backward(batches, total_targets))
        if skips_on_device(optimizer, self.scaler, self.device):
            loss = par.reduce_sum(loss_sum)  # the same sum, hence the same decision, on every rank
            finite = torch.isfinite(loss)
            self.nonfinite.record(finite, state)
            step_unless(optimizer, ~finite)
            optimizer.zero_grad(set_to_none=True)
            return loss
        loss_value = par.all_sum([float(loss_sum)])[0]  # every rank skips or steps together
        if not math.isfinite(loss_value):
            return self._skip_step(loss_value)
        if getattr(optimizer, "needs_closure", False):
            if self.scaler.is_enabled():
                raise ConfigError(
                    f"optim.name={self.cfg.optim.name} recomputes gradients inside its step, which "
                    "fp16 loss scaling cannot follow; use train.precision=bf16 or fp32"
                )

            def closure() -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                second = self._clip(self._forward_backward(batches, total_targets))
                return par.reduce_sum(second)  # summed over ranks: all decide alike on it

            second = optimizer.step(closure)
            # The optimizer left the weights alone where its second pass was not finite.
            if second is not None and not math.isfinite(float(second)):
                return self._skip_step(loss_value)
        else:
            self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.nonfinite_in_row = 0
        return torch.tensor(loss_value, dtype=torch.float64)

    def _skip_step(self, loss_value: float) -> torch.Tensor:
        """Count a step whose update was not applied (a non-finite loss) and drop its gradients."""
        state = self.state
        state.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        self.nonfinite.check(state.nonfinite_in_row, state)
        return torch.tensor(loss_value, dtype=torch.float64)

    def _forward_backward(self, batches: list[Batch], total_targets: float) -> torch.Tensor:
        self.passes += 1
        loss_sum = torch.zeros((), device=self.device)
        self.model.train()
        for i, batch in enumerate(batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.par.accumulate(self.model, last=i == len(batches) - 1):
                with self.offload(), autocast(self.device, self.precision):
                    out = self.model(**batch)
                # Weight each micro-batch by its share of all targets of the step, on every rank:
                # exactly one big batch. DDP/FSDP average gradients over ranks, hence × W.
                loss = out.loss.float() * (out.num_targets / total_targets)
                # Backward needs no logits (the loss keeps its log-probabilities): held, they
                # would occupy a tokens x vocabulary tensor through this backward and the next
                # micro-batch's forward.
                del out
                self.scaler.scale(loss * self.par.world_size).backward()
            loss_sum += loss.detach()
        # Unscaled before the hooks: a technique reads the gradients as they are, in any
        # precision. (SAM's closure runs this again, with loss scaling off: then a no-op.)
        self.scaler.unscale_(self.state.optimizer)
        for t in self.techniques:
            t.on_after_backward(self.raw_model, self.state)
        return loss_sum

    def _clip(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Clip the gradients to ``train.clip_grad``; returns ``loss_sum``, or NaN where their
        norm is not finite, so that the step is skipped as one with a non-finite loss is.

        A finite loss can still have an inf or NaN gradient, and clipping by a NaN norm writes
        NaN into every gradient: the step would then ruin every weight. On the device, no wait.
        fp16 loss scaling skips such steps itself (its overflow steps are not the run's fault).
        """
        if self.cfg.train.clip_grad <= 0:
            return loss_sum
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.train.clip_grad)
        if self.scaler.is_enabled():
            return loss_sum
        norm = whole(norm)  # FSDP2's is a DTensor; every rank gets here together
        # On the CPU under FSDP2's CPU offload (its gradients are there); a no-op otherwise.
        finite = torch.isfinite(norm).to(loss_sum.device)
        return torch.where(finite, loss_sum, float("nan"))

    def _set_lr(self) -> None:
        s = self.cfg.schedule
        factor = lr_factor(s.name, self.state.lr_progress, **s.options())
        for group in self.state.optimizer.param_groups:
            group["lr"] = group.get("initial_lr", self.cfg.optim.lr) * factor * self.state.lr_scale
        # peak_lr: the learning rate after batch-size scaling (optim.lr_scaling).
        peak = getattr(self.state.optimizer, "peak_lr", self.cfg.optim.lr)
        self.state.lr = peak * factor * self.state.lr_scale

    def _agree_usage(self) -> None:
        # The slowest rank's clock: time budgets, schedules and periodic work stay in lockstep;
        # a stop signal on any rank stops all of them. One collective on the host, per step.
        # The signal handler only sets the local flag; stop_reason changes here, where all ranks
        # agree, so no rank leaves the loop alone.
        seconds, signalled = self.par.all_max([self.clock.elapsed, float(self._signalled)])
        self.state.usage.seconds = seconds
        if signalled:
            self.stop_reason = "signal"

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        """Train until the budget is spent, a stop signal arrives, or training fails."""
        state, cfg = self.state, self.cfg
        # A signal the parent has us ignore (nohup, `cmd &` in a script) stays ignored. Outside
        # the main thread (a program that trains in a worker) signal.signal raises, and Python
        # runs handlers in the main thread only: the host program's handlers stay in charge.
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
                        if signal.getsignal(sig) is not signal.SIG_IGN}
        window_tokens, window_flops, window_time = 0, 0.0, self.clock.elapsed
        try:
            self.clock.start()
            self._agree_usage()
            state.progress = progress(self.budget, state.usage)
            while True:
                # Usage and the stop flag were agreed across ranks by the last _agree_usage and
                # not read again since, so every rank reaches the same decision at the same step:
                # the step that state.last_step announced to the hooks.
                if exhausted(self.budget, state.usage):
                    self.stop_reason = "budget"
                    break
                if self.stop_reason == "signal":
                    break
                state.lr_scale = 1.0  # techniques multiply their factors in on_step_start
                state.lr_progress = state.progress  # ... and may move where the schedule is read
                for t in self.techniques:
                    t.on_step_start(state)
                self._set_lr()
                # The global micro-batch is one micro-batch on every rank.
                state.accumulation = ramp_accumulation(
                    state.progress, cfg.train.batch_size, self.micro_batch * self.par.world_size,
                    self.ramp_unit * self.par.world_size, cfg.train.batch_ramp,
                )
                batches = []
                for _ in range(state.accumulation):
                    batch = next(self.batches)
                    state.micro_batches += 1
                    for t in self.techniques:
                        batch = t.on_batch(batch, state)
                    batches.append(batch)
                self._loss = self.train_step(batches)
                step_tokens = sum(int(b["input_ids"].numel()) for b in batches) * self.par.world_size
                fpt = self._fpt
                for t in self.techniques:
                    fpt = t.flops_per_token(fpt, state)
                fpt *= self.passes  # an optimizer's closure (SAM's second pass) computes as much again
                state.usage.steps += 1
                state.usage.tokens += step_tokens
                state.usage.flops += fpt * step_tokens
                window_tokens += step_tokens
                window_flops += fpt * step_tokens
                # Known before on_step_end, so that no technique changes the model after the last
                # step. A time budget is known to be spent only once the step has run: the clock
                # is read (and agreed across ranks) here rather than after the hooks, which makes
                # last_step exact and alike on every rank for every budget kind, and the same
                # decision as the budget check at the loop's top (usage does not change between).
                # The time on_step_end and a model swap take counts toward the next step's check.
                self._agree_usage()
                state.last_step = exhausted(self.budget, state.usage)
                for t in self.techniques:
                    t.on_step_end(state)
                self._swap_model_if_requested()
                state.progress = progress(self.budget, state.usage)
                # The step a stop signal ends on is logged too (stop_reason was agreed above): the
                # log then reaches the step the checkpoint and summary describe, and its window's
                # tokens and seconds are in a record, as a budget's last step's are.
                if state.step % cfg.train.log_every == 0 or state.last_step or self.stop_reason == "signal":
                    window_time = self._log_train(window_tokens, window_flops, window_time)
                    window_tokens, window_flops = 0, 0.0
                self._periodic()
            self.nonfinite.settle(state)  # the checkpoint written after training reads the counts
            # The training time is the clock when training stopped (the queued device work and
            # the last log line included), agreed across ranks, so no time measured afterwards
            # (the final evaluation's record, say) exceeds the run's training seconds.
            self.clock.stop()
            state.usage.seconds = self.par.all_max([self.clock.elapsed])[0]
        finally:
            self.clock.stop()  # after a failure too; stopping a stopped clock changes nothing
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return state

    def _periodic(self) -> None:
        state, cfg = self.state, self.cfg.train
        # A stopping run (budget spent, or a stop signal agreed on) gets its checkpoint and its
        # evaluation once, from pretrain, after the loop: none here on the same step.
        done = state.last_step or self.stop_reason == "signal"
        if cfg.eval_every > 0 and is_due(state.progress, state.next_eval) and not done:
            self.run_eval()
            state.next_eval = next_due(state.progress, cfg.eval_every)
        if cfg.checkpoint_every > 0 and is_due(state.progress, state.next_checkpoint) and not done:
            self.nonfinite.settle(state)  # the counts go into the checkpoint; see run_eval
            # Advance first, so the checkpoint records where the next one is due.
            state.next_checkpoint = next_due(state.progress, cfg.checkpoint_every)
            with self.clock.paused():
                self.checkpoint(state)

    def run_eval(self) -> float:
        """Validation loss on the held-out split; not counted against the budget."""
        # Settling reads the device, so the steps still queued there finish on the training clock.
        self.nonfinite.settle(self.state)
        with self.clock.paused():
            self.model.eval()
            # Optimizers that keep separate evaluation weights (Schedule-Free) switch to them,
            # and the training weights come back exactly afterwards.
            with evaluation_weights(self.state.optimizer, self.raw_model), torch.no_grad(), \
                    autocast(self.device, self.precision):
                loss = self.evaluate(self.model)
            # The slowest rank's clock, as training records and the budget use: rank 0's alone
            # could read below the same step's training record, and time-to-loss low.
            elapsed = self.par.all_max([self.clock.elapsed])[0]
            self.log({"type": "eval", "step": self.state.step, "tokens": self.state.tokens,
                      "flops": self.state.usage.flops, "elapsed": in_ms(elapsed), "val_loss": loss})
        self.state.extra["val_loss"] = loss
        return loss

    def _log_train(self, window_tokens: int, window_flops: float, window_start: float) -> float:
        state = self.state
        # The only host reads of the training step: once per log_every steps.
        self.nonfinite.settle(state)
        state.loss = float(self._loss) if self._loss is not None else float("nan")
        # Throughput from the clock read after those reads, when the device has finished the
        # window's steps (the host may run ahead of it between log steps).
        now = self.clock.elapsed
        seconds = max(now - window_start, 1e-9)
        tps = window_tokens / seconds
        # The window's FLOPs, step by step: the cost per token changes within a window under
        # layer dropping or a sequence-length warm-up, and the last step's alone misstated it.
        mfu = window_flops / seconds / self.peak_flops if self.peak_flops > 0 else 0.0
        if mfu > 1 and not self._mfu_warned and self.par.is_main:
            self._mfu_warned = True
            warnings.warn(f"MFU {mfu:.0%}: the peak of {self.peak_flops / 1e12:.3g} TFLOP/s understates this "
                          "device (measured at start-up while it was busy, most likely, or set too low); "
                          "every MFU of this run is too high by the same factor. Set train.peak_tflops to "
                          "the device's peak", stacklevel=2)
        record = {
            # The time the step's budget decision was taken on (agreed across ranks), not a later
            # clock read: a record at or past the budget is then always the run's last.
            "type": "train", "step": state.step, "tokens": state.tokens, "flops": state.usage.flops,
            "elapsed": in_ms(state.usage.seconds),
            "progress": round(state.progress, 5), "loss": state.loss, "lr": state.lr,
            "batch_size": state.accumulation * self.micro_batch * self.par.world_size, "tokens_per_s": round(tps, 1),
            "mfu": round(mfu, 4), "memory_gb": memory_gb(self.device),
            "nonfinite_total": state.nonfinite_total,
        }
        self.log(record)
        if self.bar is not None:
            left = _time_left(self.budget, state, now)
            self.bar.update(state.progress, loss=f"{state.loss:.3f}", tok_s=f"{tps:,.0f}",
                            mfu=f"{mfu:.0%}", left=left)
        return now

    def _on_signal(self, signum, frame) -> None:
        if self._signalled:  # a second ^C: stop now; the last periodic checkpoint stands
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self._signalled = True
        warnings.warn(f"received {signal.Signals(signum).name}: finishing the step and writing a checkpoint",
                      stacklevel=1)


def locate_targets(batch: Batch, model: torch.nn.Module) -> Batch:
    """``batch`` with the flat positions of its targets when ``model`` gathers them (sparse
    prediction), found here on the CPU so the model need not find them on the device (which makes
    the host wait). Computed after every ``on_batch`` hook, so it matches the final labels."""
    if not getattr(getattr(model, "config", None), "sparse_prediction", False) or "labels" not in batch:
        return batch
    index = target_index(batch["labels"])
    # Pinned like the labels (the loader pins for a GPU), so its copy is asynchronous too.
    return {**batch, "target_index": index.pin_memory() if batch["labels"].is_pinned() else index}


def _time_left(budget: Budget, state: TrainState, elapsed: float) -> str:
    if state.progress <= 0:
        return "?"
    seconds = elapsed * (1 - state.progress) / state.progress
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
