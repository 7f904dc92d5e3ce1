"""2-process torchrun on CPU (gloo): DDP and FSDP2 equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cramkit.train.run import pretrain

from .helpers import TECHNIQUE_RUNS, tiny_config, tiny_overrides

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env(tmp: Path) -> dict[str, str]:
    """torchrun's environment: its agent leaves a ``torchelastic_*`` folder in the temporary
    directory of every launch, so each test points TMPDIR into its own tmp_path (pytest prunes
    those) rather than letting the suite pile hundreds of them into /tmp."""
    scratch = tmp / "launcher-tmp"
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}


def _two_ranks(tmp: Path, *args) -> subprocess.CompletedProcess:
    """dist_worker.py ``args`` on 2 ranks (torchrun, gloo), asserted to succeed."""
    env = _launcher_env(tmp)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(Path(__file__).with_name("dist_worker.py")), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_ranks_match_one_process(tiny_clm_data, tiny_mlm_data, tmp_path):
    out = tmp_path / "dist"
    proc = _two_ranks(tmp_path, tiny_clm_data, out, tiny_mlm_data)
    assert "`broadcast_buffers` is deprecated" not in proc.stderr, proc.stderr[-3000:]  # DDP, torch 2.13
    res = json.loads((out / "results.json").read_text())

    single = tiny_config(tiny_clm_data, tmp_path, "train.budget=6steps", "train.micro_batch=0",
                         name="single", arch="gpt")
    summary = pretrain(single, say=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    one = [r["loss"] for r in rows if r["type"] == "train"]

    assert res["ddp"]["tokens"] == summary["tokens"]  # tokens count every rank's share
    # ... and so MFU divides by both ranks' peak (train.peak_tflops=0.1 each), not one device's.
    for strategy in ("ddp", "fsdp"):
        r = res[strategy]
        expected = r["flops"] / r["train_seconds"] / 0.2e12
        assert r["mfu"] == pytest.approx(expected, rel=0.02, abs=1e-4), strategy
    torch.testing.assert_close(torch.tensor(res["ddp"]["losses"]), torch.tensor(one), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(res["fsdp"]["losses"]), torch.tensor(one), rtol=1e-4, atol=1e-5)
    for strategy, fused in res["fused_losses"].items():  # fused vs for-loop AdamW: rounding only
        torch.testing.assert_close(torch.tensor(fused), torch.tensor(one), rtol=1e-4, atol=1e-5, msg=strategy)
    # Techniques under DDP / FSDP2 (PLD's skipped blocks leave parameters unused; stacking and
    # the V-cycle build their new models from sharded ones) follow the one-process curve.
    single_runs = {}
    for key, two in res["technique_losses"].items():
        technique = key.split()[0]
        if technique not in single_runs:
            run = f"single-{technique}"
            with warnings.catch_warnings():  # every change is made and trained within the 6 steps
                warnings.filterwarnings("error", message="the budget ran out with the model at")
                pretrain(tiny_config(tiny_clm_data, tmp_path, "train.budget=6steps", "train.micro_batch=0",
                                     *TECHNIQUE_RUNS[technique], name=run, arch="gpt"), say=lambda *_: None)
            rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            single_runs[technique] = [r["loss"] for r in rows if r["type"] == "train"]
        torch.testing.assert_close(torch.tensor(two), torch.tensor(single_runs[technique]), rtol=1e-4, atol=1e-5,
                                   msg=key)
    # Resumed from a 2-rank checkpoint: the rest of the curve, and the same final weights.
    assert res["resumed_losses"] == res["ddp"]["losses"][3:]
    a, b = load_file(res["ddp_weights"]), load_file(res["cut_weights"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(res["fsdp_resumed_losses"]), torch.tensor(res["fsdp"]["losses"][3:]),
                               rtol=1e-6, atol=1e-6)
    assert res["fsdp_bert_steps"] == 2
    # MLM: masks follow the sequence, not the rank or micro-batch that reads it, so DDP over 2
    # ranks with accumulation trains as one process on the same global batch.
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=4steps", "train.micro_batch=0", name="single-mlm"),
             say=lambda *_: None)
    torch.testing.assert_close(torch.tensor(res["ddp_mlm_losses"]), torch.tensor(_losses(tmp_path / "single-mlm")),
                               rtol=1e-4, atol=1e-5)
    # A signal to one rank stops both (the summary is rank 0's), a step later, with a checkpoint.
    assert res["signalled"] == ["signal", 4] and res["signalled_checkpoint"] == "step-00000004"
    assert res["control_reused"]
    # Leaving the group stopped the threads of every gloo group cramkit made (a control and a
    # patient one: 3 threads each); only the default group's, which torch keeps once DDP or FSDP2
    # used it, remain. Threads left for the interpreter's shutdown may abort a finished rank.
    for rank in range(2):  # CI's abort was rank 1's
        threads = json.loads((out / f"threads-{rank}.json").read_text())
        assert len(threads) <= 3, (rank, threads)
    # A wall-clock budget stops both ranks at the same step.
    assert res["timed_steps"][0] == res["timed_steps"][1] > 0
    # An inf in rank 0's gradient shard only: both ranks skip (weights unchanged), both halve.
    assert res["sharded_overflow"] == [[1.0, 512.0], [1.0, 512.0]]
    # Every optimizer that FSDP2 does not refuse takes the whole model's steps on its shards, and
    # goes on alike from its checkpointed state: elementwise ones and Muon (Newton-Schulz on the
    # gathered matrix) exactly, SAM up to the rounding of its norm over shards.
    from cramkit.optim import OPTIMIZERS, WHOLE_TENSORS

    checked = res["sharded_optimizers"]
    assert set(OPTIMIZERS) - set(WHOLE_TENSORS) <= set(checked), sorted(checked)
    for case, diffs in checked.items():
        assert max(diffs) <= (1e-6 if case.startswith(("sam", "asam")) else 0.0), (case, diffs)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nonfinite_gradient_on_one_rank_is_skipped_on_every_rank(tiny_clm_data, tmp_path, strategy):
    """An inf in rank 1's gradient only, at step 2 of 4, under train.clip_grad (the loss stays
    finite): every rank skips that step and counts it, and both train on with the same weights.
    DDP all-reduces the inf into every rank's gradient; under FSDP2 it lands in rank 0's shard
    (the weight's first row), not in that of rank 1, which put it there. (The ranks agree through
    the loss summed over them, which the norm check turns to NaN, as much as through the norm.)"""
    out = tmp_path / "dist"
    _two_ranks(tmp_path, "nonfinite-gradient", tiny_clm_data, out, strategy)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    for fused in ("off", "on"):  # the skip decided on the host / on the device
        name = f"{strategy}-fused-{fused}"
        summary = json.loads((out / name / "summary.json").read_text())
        assert (summary["steps"], summary["nonfinite_steps"]) == (4, 1), name
        losses = _losses(out / name)  # the skipped step's loss is logged as null
        assert losses[1] is None and all(isinstance(x, float) for x in losses[:1] + losses[2:]), (name, losses)
        # Each rank counted the skip itself, and its optimizer stepped 3 times, not 4.
        assert [r[name] for r in ranks] == [{"steps": 4, "nonfinite": 1, "optimizer_steps": [3.0]}] * 2, ranks
        a, b = (load_file(out / f"{name}-weights-{r}.safetensors") for r in range(2))
        for key in a:
            assert torch.isfinite(a[key]).all(), (name, key)
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name} {key}")


def test_a_failure_of_rank_0_alone_stops_the_other_ranks_at_once(tiny_mlm_data, tmp_path):
    """Rank 0 prepares the data, creates the run directory and writes checkpoints alone; the
    other ranks waited in a barrier or gather. When that work failed they hung until the process
    group's timeout (or died of the lost connection, with a traceback); when it outlasted the
    timeout (a large corpus), they failed although nothing was wrong."""
    out = tmp_path / "dist"
    _two_ranks(tmp_path, "rank0-failures", tiny_mlm_data, out)
    zero, one = (json.loads((out / f"rank-{r}.json").read_text()) for r in range(2))
    assert zero["bad-source"][:1] == ["DataError"] and "missing.txt" in zero["bad-source"][1]
    assert zero["name-taken"][:1] == ["ConfigError"] and zero["checkpoint-write"][:1] == ["OSError"]
    for name, what in (("bad-source", "preparing the data"), ("name-taken", "creating the run directory"),
                       ("checkpoint-write", "writing the checkpoint of step 2")):
        kind, message, seconds = one[name]
        assert kind == "RankFailed" and message.startswith(f"rank 0 failed while {what}: "), (name, one[name])
        assert message.endswith(zero[name][1]) and seconds < 6, (name, one[name])  # the timeout is 8 s
    assert zero["slow-prepare"][:2] == one["slow-prepare"][:2] == ["ok", ""], (zero, one)
    summary = json.loads((out / "slow-prepare" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert not (out / "bad-source").exists() and sorted(p.name for p in (out / "taken").iterdir()) == ["file"]


def test_two_ranks_resume_with_another_micro_batch(tiny_mlm_data, tmp_path):
    """Resumed at step 3 of 6 with micro-batch 2 (DDP) or 1 (FSDP2) instead of each rank's 4:
    every rank trains the uninterrupted run's sequences under its masks at every later step, and
    the run ends where the uninterrupted one did (SGD: up to the rounding of the accumulation)."""
    out = tmp_path / "dist"
    _two_ranks(tmp_path, "resume-micro-batch", tiny_mlm_data, out)
    for strategy in ("ddp", "fsdp"):
        for rank in range(2):
            full, resumed = (torch.load(out / f"{name}-steps-{rank}.pt", weights_only=True)
                             for name in (strategy, f"{strategy}-cut"))
            assert len(full) == 6 and len(resumed) == 3
            assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed, strict=True)), (strategy, rank)
        torch.testing.assert_close(torch.tensor(_losses(out / f"{strategy}-cut")),
                                   torch.tensor(_losses(out / strategy)[3:]), rtol=1e-5, atol=1e-6)
        a, b = (load_file(out / name / "checkpoints" / "step-00000006" / "model.safetensors")
                for name in (strategy, f"{strategy}-cut"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{strategy} {key}")


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def test_the_readmes_multi_node_command_line_trains_across_two_nodes(tiny_clm_data, tmp_path):
    """README's two-machine form (one torchrun per node, c10d rendezvous), with one process per
    "node" on this machine: FSDP2 across the nodes follows one process's curve, and
    only the first node's rank 0 writes the run."""
    port = _free_port()
    env = _launcher_env(tmp_path)
    args = tiny_overrides(tiny_clm_data, tmp_path / "nodes", "train.budget=4steps", "parallel.strategy=fsdp",
                          name="two-nodes", arch="gpt")
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cramkit-test",
         "-m", "cramkit.cli", "pretrain", "demo", *args],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True) for log in logs]
    _wait_for_launchers(nodes, tmp_path / "nodes" / "two-nodes" / "summary.json")
    outputs = [log.read_text() for log in logs]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    # c10d hands out the ranks (torchrun warns that a --node-rank would be ignored): whichever
    # node got rank 0 printed the run's summary, the other nothing of it.
    assert sum("stopped by budget after 4 steps" in out for out in outputs) == 1, outputs
    assert not any("node_rank is only used" in out for out in outputs)
    assert [p.name for p in (tmp_path / "nodes").iterdir()] == ["two-nodes"]
    single = tiny_config(tiny_clm_data, tmp_path, "train.budget=4steps", name="single", arch="gpt")
    pretrain(single, say=lambda *_: None)
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "nodes" / "two-nodes")),
                               torch.tensor(_losses(tmp_path / "single")), rtol=1e-4, atol=1e-5)


def _wait_for_launchers(nodes: list[subprocess.Popen], summary: Path, limit: float = 300.0,
                        grace: float = 30.0) -> None:
    """Wait for both torchrun launchers. Once the run has written its summary and one launcher
    has exited 0, the other gets ``grace`` seconds: torch's elastic agents meet at an exit
    barrier with a fixed 300 s timeout, which one agent once waited out in a loaded CI run after
    its worker had finished (the barrier has known races: pytorch/pytorch#69520).
    That launcher is stopped and counted as done only when its worker has exited (the barrier
    is all it has left); a worker still running, or one that failed, fails the test."""
    import time

    def workerless(node: subprocess.Popen) -> bool:
        children = Path(f"/proc/{node.pid}/task/{node.pid}/children")
        return children.is_file() and not children.read_text().split()

    end = time.monotonic() + limit
    while time.monotonic() < end and any(node.poll() is None for node in nodes):
        if summary.is_file() and any(node.poll() == 0 for node in nodes):
            end = min(end, time.monotonic() + grace)
        time.sleep(0.2)
    for node in nodes:
        if node.poll() is None:
            barrier_only = summary.is_file() and workerless(node)
            node.kill()
            node.wait()
            if barrier_only and any(other.returncode == 0 for other in nodes):
                node.returncode = 0


def test_fsdp_root_keeps_its_parameters_gathered_for_backward():
    """Blocks reshard after forward (fsdp_reshard); the root must not: its head and embeddings
    are needed again at once in backward. An explicit reshard_after_forward=True on the root
    crashed the first backward on torch 2.11, the GPU image's version."""
    import torch.distributed as dist

    from cramkit.distributed.config import ParallelConfig
    from cramkit.distributed.parallel import Parallel, shard_model
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = build_model(preset_config("tiny-gpt", vocab_size=512, max_positions=64))
        par = Parallel(0, 1, 0, "fsdp", torch.device("cpu"), launched=True)
        shard_model(model, par, ParallelConfig(strategy="fsdp", fsdp_reshard=True), "fp32")
        x = torch.randint(0, 512, (2, 16))
        out = model(input_ids=x, labels=torch.roll(x, -1, 1))
        sharded = lambda p: type(p).__name__ == "DTensor"  # noqa: E731
        assert sharded(model.layers[0].attn.qkv.weight)  # a block: freed after its forward
        assert not sharded(model.head.decoder.weight)  # the root: still gathered
        out.loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_schedule_free_evaluates_and_trains_on_under_fsdp_as_in_one_process():
    """Schedule-Free evaluates its average x: its weights are switched and put back around every
    evaluation and checkpoint. Under FSDP2 that restore wrote into the model's parameters, which
    a forward pass without backward leaves gathered (plain tensors): the first evaluation crashed
    ("mixed torch.Tensor and DTensor"). And gathered copies made with x must not serve the next
    training step."""
    import torch.distributed as dist

    from cramkit.config import load_config
    from cramkit.distributed.config import ParallelConfig
    from cramkit.distributed.parallel import Parallel, shard_model
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config
    from cramkit.optim import build_optimizer, evaluation_weights

    optim = load_config("demo", ["optim.name=schedulefree", "schedule.name=constant"]).optim
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "labels": torch.roll(x, -1, 1)}

    def train_eval_train(model) -> tuple[list[float], dict]:
        opt = build_optimizer(model, optim, torch.device("cpu"), 8)
        losses = []
        for step in range(4):
            if step == 2:
                with evaluation_weights(opt, model), torch.no_grad():
                    model.eval()
                    losses.append(float(model(**batch).loss))
                model.train()
            out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(out.loss.detach()))
        full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v  # noqa: E731
        return losses, {k: full(v).detach().clone() for k, v in model.state_dict().items()}

    torch.manual_seed(0)
    config = preset_config("tiny-gpt", vocab_size=512, max_positions=64)
    one = build_model(config)
    sharded = build_model(config)
    sharded.load_state_dict(one.state_dict())
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        par = Parallel(0, 1, 0, "fsdp", torch.device("cpu"), launched=True)
        shard_model(sharded, par, ParallelConfig(strategy="fsdp", fsdp_reshard=False), "fp32")
        got, got_weights = train_eval_train(sharded)
    finally:
        dist.destroy_process_group()
    want, want_weights = train_eval_train(one)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=1e-6)
    for key, value in want_weights.items():
        torch.testing.assert_close(got_weights[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("optim_name", ["adamw", "schedulefree"])
def test_a_checkpoint_of_an_optimizer_without_state_under_fsdp_changes_no_step(optim_name):
    """A V-cycle level or a stacking doubling builds a fresh optimizer, and a checkpoint may fall
    on that step. Under FSDP2 torch's getter first "initialised" the optimizer with a step at
    lr 0: AdamW's step count then ran one ahead of a run without the checkpoint (another bias
    correction), and a resumed Schedule-Free one ran one ahead of the run it continued."""
    import torch.distributed as dist

    from cramkit.config import load_config
    from cramkit.distributed.config import ParallelConfig
    from cramkit.distributed.parallel import Parallel, shard_model
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config
    from cramkit.optim import build_optimizer
    from cramkit.train.run import _checkpoint_weights, _load_optimizer

    optim = load_config("demo", [f"optim.name={optim_name}", "schedule.name=constant"]).optim
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    config = preset_config("tiny-gpt", vocab_size=512, max_positions=64)
    first = build_model(config)
    models = [first] + [build_model(config) for _ in range(2)]
    for model in models[1:]:
        model.load_state_dict(first.state_dict())
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        par = Parallel(0, 1, 0, "fsdp", torch.device("cpu"), launched=True)
        for model in models:
            shard_model(model, par, ParallelConfig(strategy="fsdp"), "fp32")
        plain, saved, resumed = models
        optimizers = [build_optimizer(m, optim, torch.device("cpu"), 8) for m in models]
        _, _, state = _checkpoint_weights(saved, optimizers[1], par)
        _load_optimizer(resumed, optimizers[2], state, par)
        for model, opt in zip(models, optimizers):
            for _ in range(2):
                model(input_ids=x, labels=torch.roll(x, -1, 1)).loss.backward()
                opt.step()
                opt.zero_grad()
        weights = [{k: v.full_tensor() for k, v in m.state_dict().items()} for m in models]
    finally:
        dist.destroy_process_group()
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), f"checkpointed: {key}"
        assert torch.equal(weights[2][key], value), f"resumed: {key}"


def test_a_rank_asked_for_what_this_machine_lacks_says_so(monkeypatch):
    """Under torchrun, train.device=cuda without CUDA trained on the CPU without a word, and
    parallel.backend=nccl was torch's traceback on every rank."""
    from cramkit.distributed.config import ParallelConfig
    from cramkit.distributed.parallel import init_parallel
    from cramkit.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    for key, value in {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="device 'cuda' needs CUDA"):
        init_parallel(ParallelConfig(), "cuda")
    with pytest.raises(ConfigError, match="parallel.backend=nccl needs CUDA GPUs"):
        init_parallel(ParallelConfig(backend="nccl"), "auto")


def test_resuming_a_checkpoint_without_fsdp_under_fsdp_says_which_strategy_to_use():
    """An optimizer state saved without FSDP is keyed by parameter index; FSDP2's loader wants
    names, and its KeyError ('state.0.step') was reported as a checkpoint of another version."""
    from cramkit.distributed.parallel import Parallel
    from cramkit.train.run import _format_mismatch

    fsdp = Parallel(0, 2, 0, "fsdp", torch.device("cpu"), launched=True)
    ddp = Parallel(0, 2, 0, "ddp", torch.device("cpu"), launched=True)
    by_index = {"optimizer": {"state": {0: {"step": 1}}}, "strategy": "ddp"}
    by_name = {"optimizer": {"state": {"layers.0.attn.qkv.weight": {"step": 1}}}, "strategy": "fsdp"}
    assert str(_format_mismatch(by_index, fsdp)).startswith(
        "parallel.strategy=fsdp differs from the ddp this run was checkpointed with: FSDP2 cannot read")
    # A single process's checkpoint said "parallel.strategy=none", a value no one can give.
    assert "from the single-process training this run" in str(
        _format_mismatch({"optimizer": {"state": {0: {}}}, "strategy": "none"}, fsdp))
    assert "from the ddp (or single-process) training" in str(_format_mismatch({"optimizer": {"state": {0: {}}}}, fsdp))
    assert _format_mismatch(by_index, ddp) is None and _format_mismatch(by_name, fsdp) is None
    assert _format_mismatch(by_name, ddp) is None  # FSDP2's full state loads without it
    assert _format_mismatch({"optimizer": {"state": {}}}, fsdp) is None  # nothing to read yet
