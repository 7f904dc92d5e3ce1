"""GPU-side helpers tested on CPU with the CUDA calls stood in for: automatic micro-batch
sizing, FP8 layer selection, the NVML energy meter."""

from __future__ import annotations

import contextlib
import sys
import types
import warnings

import pytest
import torch

from cramkit.config import config_from_dict
from cramkit.distributed import fp8
from cramkit.errors import ConfigError
from cramkit.models import build_model
from cramkit.models.presets import preset_config
from cramkit.train import device as device_mod
from cramkit.train import run as run_mod
from cramkit.train.energy import EnergyMeter

CUDA = torch.device("cuda", 0)  # only a name here: nothing runs on it


class _FakeGPU:
    """torch.cuda's memory calls, with the peak a function of the micro-batch last built."""

    def __init__(self, monkeypatch, total: float, per_sequence: float, oom_from: int | None = None):
        self.total, self.per_sequence, self.oom_from, self.sizes = total, per_sequence, oom_from, []
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=total))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: self.sizes[-1] * per_sequence)

    def make_batch(self, n: int) -> dict[str, torch.Tensor]:
        self.sizes.append(n)
        if self.oom_from is not None and n >= self.oom_from:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        ids = torch.randint(5, 256, (n, 8))
        return {"input_ids": ids, "labels": ids}


def _model():
    return build_model(preset_config("tiny-gpt", vocab_size=256, max_positions=16))


def test_auto_micro_batch_takes_the_largest_power_of_two_that_fits_with_the_optimizer(monkeypatch):
    gpu = _FakeGPU(monkeypatch, total=100, per_sequence=10)
    model = _model()
    # 90 % of 100 usable; 20 reserved for optimizer state: 4 sequences (60) fit, 8 (100) do not.
    assert device_mod.auto_micro_batch(model, gpu.make_batch, CUDA, "fp32", cap=64, optimizer_bytes=20) == 4
    assert gpu.sizes == [1, 2, 4, 8]
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
    gpu.sizes.clear()
    assert device_mod.auto_micro_batch(model, gpu.make_batch, CUDA, "fp32", cap=2, optimizer_bytes=0) == 2
    assert gpu.sizes == [1, 2]  # never beyond the per-rank batch


def test_auto_micro_batch_divides_the_per_rank_batch(monkeypatch):
    # A per-rank batch of 96: 64 fits in memory but does not divide it (the run would refuse it).
    gpu = _FakeGPU(monkeypatch, total=1e12, per_sequence=1)
    assert device_mod.auto_micro_batch(_model(), gpu.make_batch, CUDA, "fp32", cap=96, optimizer_bytes=0) == 32
    assert gpu.sizes == [1, 2, 4, 8, 16, 32]


def test_auto_micro_batch_stops_at_the_first_out_of_memory(monkeypatch):
    gpu = _FakeGPU(monkeypatch, total=1e12, per_sequence=1, oom_from=16)
    model = _model()
    assert device_mod.auto_micro_batch(model, gpu.make_batch, CUDA, "fp32", cap=1024, optimizer_bytes=0) == 8
    assert gpu.sizes[-1] == 16 and all(p.grad is None for p in model.parameters())


def test_auto_micro_batch_warns_and_tries_one_when_nothing_fits(monkeypatch):
    gpu = _FakeGPU(monkeypatch, total=100, per_sequence=1000)
    with pytest.warns(UserWarning, match="not even one sequence fits"):
        assert device_mod.auto_micro_batch(_model(), gpu.make_batch, CUDA, "fp32", cap=8, optimizer_bytes=0) == 1


class _SavedBytesGPU:
    """torch.cuda's memory calls, with the peak the bytes autograd saved from one peak reset to
    the next reading: what checkpointing and activation offloading keep off the device."""

    def __init__(self, monkeypatch, total: float):
        self.saved: list[int] = []
        self.hooks = contextlib.ExitStack()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=total))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: self.reset())
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: self.read())

    def reset(self) -> None:
        # Entered before the probe's forward context: checkpointing's and save_on_cpu's own
        # hooks, inside, take precedence, so what they keep off the device is never counted.
        self.hooks.close()
        self.saved.clear()
        self.hooks.enter_context(torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.saved.append(t.numel() * t.element_size())
        return t

    def read(self) -> int:
        self.hooks.close()
        return sum(self.saved)

    @staticmethod
    def make_batch(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(5, 256, (n, 16), generator=torch.Generator().manual_seed(n))
        return {"input_ids": ids, "labels": ids}


def test_auto_micro_batch_runs_each_forward_in_the_given_context(monkeypatch):
    gpu, entered = _FakeGPU(monkeypatch, total=1e12, per_sequence=1), []

    @contextlib.contextmanager
    def context():
        entered.append(len(gpu.sizes))
        yield

    device_mod.auto_micro_batch(_model(), gpu.make_batch, CUDA, "fp32", cap=4, optimizer_bytes=0, forward_context=context)
    assert entered == [0, 1, 2]  # one per trial, entered before its batch was made and run


@pytest.mark.parametrize("switch", ["memory.activation_checkpointing=full", "memory.offload_activations=true"])
def test_the_micro_batch_probe_trains_with_the_runs_memory_switches(monkeypatch, switch):
    # What the switch takes off the device must buy a larger micro-batch: sized without it, a
    # user who turned on checkpointing to fit more sequences would get the micro-batch as before.
    model_section = {"preset": "tiny-gpt", "vocab_size": 256, "max_positions": 16}
    cfg = config_from_dict({"model": model_section})
    model = _model()
    gpu = _SavedBytesGPU(monkeypatch, total=0)
    torch.cuda.reset_peak_memory_stats()
    model(**gpu.make_batch(8)).loss.backward()
    eight = torch.cuda.max_memory_allocated()  # bytes saved by an unswitched forward of 8 sequences
    model.zero_grad(set_to_none=True)
    gpu = _SavedBytesGPU(monkeypatch, total=1.05 * eight / 0.9)  # 8 fit unswitched, 16 do not
    assert run_mod.probe_micro_batch(cfg, model, gpu.make_batch, CUDA, "fp32", 1024, 0) == 8
    key, value = switch.removeprefix("memory.").split("=")
    switched = config_from_dict({"model": model_section, "memory": {key: {"true": True}.get(value, value)}})
    assert run_mod.probe_micro_batch(switched, _model(), gpu.make_batch, CUDA, "fp32", 1024, 0) > 8
    if key == "offload_activations":  # compiled, the backward brings them all back: nothing saved
        compiled = config_from_dict({"model": model_section, "memory": {key: True}, "train": {"compile": True}})
        assert run_mod.probe_micro_batch(compiled, _model(), gpu.make_batch, CUDA, "fp32", 1024, 0) == 8


def test_fp8_takes_only_linears_large_enough_to_gain():
    # torchao's tensorwise rule: skip when out_features <= 4096 and in_features <= 1024.
    assert fp8.worth_fp8(torch.nn.Linear(2048, 8192))
    assert not fp8.worth_fp8(torch.nn.Linear(768, 3072))  # crammed-bert's up-projection: bf16 wins
    assert not fp8.worth_fp8(torch.nn.Linear(768, 2304))  # ... and its fused qkv
    assert fp8.worth_fp8(torch.nn.Linear(1536, 768))  # its down-projection reads 1536 > 1024
    assert fp8.worth_fp8(torch.nn.Linear(768, 8192))  # out_features > 4096
    assert not fp8.worth_fp8(torch.nn.Linear(2048, 2056))  # FP8 kernels need multiples of 16
    assert not fp8.worth_fp8(torch.nn.LayerNorm(4096))
    assert fp8.worth_fp8(torch.nn.Linear(768, 768), everything=True)


def test_fp8_refuses_a_device_without_fp8_tensor_cores(monkeypatch):
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU with FP8"):
        fp8.convert_fp8(_model(), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))  # A100
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU with FP8"):
        fp8.convert_fp8(_model(), CUDA)


def _fake_torchao_wide_model(monkeypatch, convert_to_float8_training):
    """A Hopper GPU and torchao.float8 with the given conversion, as far as convert_fp8 can
    tell; returns a (meta) model wide enough for FP8 to pay off."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    float8 = types.ModuleType("torchao.float8")
    float8.convert_to_float8_training = convert_to_float8_training
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", float8)
    with torch.device("meta"):
        return build_model(preset_config("tiny", hidden=2048, heads=16, intermediate=8192, layers=1, vocab_size=4096))


def test_fp8_converts_the_qualifying_block_linears_never_the_head(monkeypatch):
    converted = []

    def convert_to_float8_training(model, module_filter_fn):
        converted.extend(n for n, m in model.named_modules() if module_filter_fn(m, n))
        return model

    wide = _fake_torchao_wide_model(monkeypatch, convert_to_float8_training)
    fp8.convert_fp8(wide, CUDA)
    assert converted and all(n.startswith("layers.") for n in converted)
    assert all(fp8.worth_fp8(wide.get_submodule(n)) for n in converted)
    # A model with nothing worth converting stays as it is, and says so.
    converted.clear()
    with pytest.warns(UserWarning, match="FP8 would slow this model down"):
        fp8.convert_fp8(_model(), CUDA)
    assert converted == []
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # torchao not installed
    with pytest.raises(ConfigError, match="pip install 'cramkit\\[fp8\\]'"):
        fp8.convert_fp8(wide, CUDA)


def test_fp8_keeps_the_fused_matrices_part_counts_for_muon(monkeypatch):
    """torchao's ``Float8Linear.from_float`` builds a new module around the same weight; the
    ``stacked_matrices`` of the one it replaces must carry over, or Muon orthogonalises a fused
    qkv (and a GLU's [value | gate]) as one matrix under FP8."""
    from cramkit.optim import parameter_groups

    class Float8Linear(torch.nn.Linear):
        @classmethod
        def from_float(cls, mod):  # as torchao/float8/float8_linear.py does
            with torch.device("meta"):
                new = cls(mod.in_features, mod.out_features, bias=False)
            new.weight, new.bias = mod.weight, mod.bias
            return new

    def convert_to_float8_training(model, module_filter_fn):
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and module_filter_fn(module, name):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, Float8Linear.from_float(module))
        return model

    wide = _fake_torchao_wide_model(monkeypatch, convert_to_float8_training)
    fp8.convert_fp8(wide, CUDA)
    block = wide.layers[0]
    assert isinstance(block.attn.qkv, Float8Linear) and isinstance(block.ffn.up, Float8Linear)
    hidden = next(g for g in parameter_groups(wide, 0.0) if g["kind"] == "hidden")
    parts = {id(p): k for p, k in zip(hidden["params"], hidden["stacked"])}
    assert parts[id(block.attn.qkv.weight)] == 3 and parts[id(block.ffn.up.weight)] == 2


def _fake_nvml(monkeypatch, readings: list[int], fail: bool = False):
    nvml = types.ModuleType("pynvml")

    def init():
        if fail:
            raise RuntimeError("NVML Shared Library Not Found")

    nvml.nvmlInit = init
    nvml.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda handle: readings.pop(0)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_energy_is_the_nvml_counter_difference_in_kwh(monkeypatch):
    # The counter runs since the driver loaded: 90 MJ (25 kWh) before the run, 7.2 MJ (2 kWh) in it.
    _fake_nvml(monkeypatch, [90_000_000_000, 90_000_000_000 + 7_200_000_000])
    meter = EnergyMeter(CUDA)
    assert meter.available and meter.kwh() == pytest.approx(2.0)


def test_energy_meters_the_gpu_cuda_visible_devices_names(monkeypatch):
    # NVML ignores CUDA_VISIBLE_DEVICES: the process's cuda:0 is the machine's GPU 3 here.
    _fake_nvml(monkeypatch, [0, 3_600_000])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert EnergyMeter(CUDA)._handle == "gpu3"


def test_a_failed_energy_read_is_not_measured_and_does_not_end_the_run(monkeypatch):
    _fake_nvml(monkeypatch, [5_000])  # the second read finds no reading left: it raises
    meter = EnergyMeter(CUDA)
    assert meter.available and meter.kwh() is None and not meter.available


def test_energy_is_unavailable_without_nvml_or_a_gpu(monkeypatch):
    _fake_nvml(monkeypatch, [1, 2], fail=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently unavailable: the summary says "not measured"
        assert EnergyMeter(CUDA).kwh() is None
    assert not EnergyMeter(torch.device("cpu")).available


class _Meter:
    """Stands in for the NVML meter: every process segment of a run uses 0.25 kWh."""

    def __init__(self, device):
        pass

    def kwh(self):
        return 0.25


def test_energy_of_a_resumed_run_covers_the_whole_run(monkeypatch, tiny_mlm_data, tmp_path):
    """kWh per billion tokens divided the resumed segment's energy by the whole run's tokens."""
    from cramkit.train import run as run_mod
    from cramkit.train.run import pretrain, resume_config

    from .helpers import interrupted_copy, tiny_config

    monkeypatch.setattr(run_mod, "EnergyMeter", _Meter)
    quiet = lambda *_: None  # noqa: E731
    full = pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.checkpoint_every=0.5", name="full"), say=quiet)
    assert full["energy_kwh"] == 0.25
    assert full["kwh_per_billion_tokens"] == pytest.approx(0.25 / (full["tokens"] / 1e9))
    cut = interrupted_copy(tmp_path / "full", tmp_path / "cut", 4)
    resumed = pretrain(resume_config(cut, []), run_dir=cut, resume=True, say=quiet)
    assert resumed["tokens"] == full["tokens"]
    assert resumed["energy_kwh"] == 0.5  # the first segment's, from the checkpoint, and this one's
    assert resumed["kwh_per_billion_tokens"] == pytest.approx(0.5 / (full["tokens"] / 1e9))


def test_the_energy_meter_runs_through_the_compile_warm_up(monkeypatch, tiny_mlm_data, tmp_path):
    """Compiling (and micro-batch probing) is GPU work the run pays for: the meter must start
    before it, not once the trainer is ready."""
    from cramkit.train import run as run_mod
    from cramkit.train.run import pretrain

    from .helpers import tiny_config

    events = []
    real_compiler = run_mod._compiler

    class Meter(_Meter):
        def __init__(self, device):
            events.append("meter")

    def compiler(enabled, warm_up):
        compile_model = real_compiler(enabled, warm_up)

        def recorded(model):
            events.append("compile")
            return compile_model(model)

        return recorded

    monkeypatch.setattr(run_mod, "EnergyMeter", Meter)
    monkeypatch.setattr(run_mod, "_compiler", compiler)
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=1steps"), say=lambda *_: None)
    assert events[:2] == ["meter", "compile"]


def test_environment_names_the_commit_of_a_checkout_copied_without_git(monkeypatch):
    """The GPU machine gets the working tree without .git: its runs recorded no commit at all."""
    import subprocess

    from cramkit.train import runlog

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(runlog.subprocess, "run", no_git)
    monkeypatch.delenv("CRAMKIT_COMMIT", raising=False)
    assert "git_commit" not in runlog.environment(torch.device("cpu"))
    monkeypatch.setenv("CRAMKIT_COMMIT", "abc1234")
    assert runlog.environment(torch.device("cpu"))["git_commit"] == "abc1234"
    checkout = runlog.Path(runlog.__file__).resolve().parents[3]
    monkeypatch.setattr(runlog.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, f"{checkout}\nf00d\n", ""))
    assert runlog.environment(torch.device("cpu"))["git_commit"] == "f00d"  # git, where there is one, wins


def test_environment_names_no_commit_of_a_repository_cramkit_is_merely_installed_in(tmp_path, monkeypatch):
    """cramkit installed (not editable) into a virtual environment inside the user's own git
    repository: git, asked from the installed package, finds that repository, whose commit was
    recorded as cramkit's."""
    import shutil
    import subprocess

    from cramkit.train import runlog

    if shutil.which("git") is None:
        pytest.skip("needs git")
    project = tmp_path / "project"
    installed = project / ".venv" / "lib" / "python3" / "site-packages" / "cramkit" / "train"
    installed.mkdir(parents=True)
    git = ["git", "-C", str(project), "-c", "user.name=u", "-c", "user.email=u@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "the user's project"], check=True)
    monkeypatch.setattr(runlog, "__file__", str(installed / "runlog.py"))
    monkeypatch.delenv("CRAMKIT_COMMIT", raising=False)
    assert "git_commit" not in runlog.environment(torch.device("cpu"))
