"""The small shared parts of the training path: trainable state, the schedule, right-padding, TrainState."""

import pytest
import torch
from torch import nn

from dsxfer.data.qa import right_pad
from dsxfer.errors import DataError
from dsxfer.method import trainable
from dsxfer.method.schedule import warmup_then_decay
from dsxfer.training.checkpoint import TrainState


class Parts(nn.Module):
    """A frozen 'backbone' tensor, a trainable head and a trainable soft prompt under its real name."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.backbone = nn.Linear(3, 3)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(3, 2)
        self.prompt = nn.Module()
        self.prompt.parts = nn.ModuleDict({"trainable": nn.Module()})
        self.prompt.parts["trainable"].embeddings = nn.Parameter(torch.randn(4, 3, generator=g))
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(2, 3, generator=g))


def test_save_writes_atomically_and_load_restores_exactly(tmp_path):
    model = Parts(seed=1)
    path = trainable.save(model, tmp_path / "run", run_name="r")
    assert path == tmp_path / "run" / trainable.TRAINABLE_FILE
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [trainable.PROMPT_FILE, trainable.TRAINABLE_FILE]  # no .tmp left
    state = trainable.read(path)
    assert set(state) == {"head.weight", "head.bias", trainable.PROMPT_KEY}  # the frozen tensor is not saved
    fresh = Parts(seed=2)
    trainable.load(fresh, state, source=str(path))
    for name, value in trainable.gather(model).items():
        assert torch.equal(dict(fresh.named_parameters())[name], value)


def test_non_finite_values_are_never_written_and_the_earlier_file_stays(tmp_path):
    model = Parts()
    trainable.save(model, tmp_path)
    before = (tmp_path / trainable.TRAINABLE_FILE).read_bytes()
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(trainable.NonFiniteError, match="first: head.bias"):
        trainable.save(model, tmp_path)
    assert (tmp_path / trainable.TRAINABLE_FILE).read_bytes() == before


def test_every_mismatch_on_load_is_one_data_error(tmp_path):
    state = trainable.gather(Parts())
    with pytest.raises(DataError, match=r"f: trainable tensor head.bias is missing \(1 in all\); the file is incomplete"):
        trainable.load(Parts(), {k: v for k, v in state.items() if k != "head.bias"}, source="f")
    with pytest.raises(DataError, match="f: 1 tensors do not belong to this model"):
        trainable.load(Parts(), {**state, "extra.weight": torch.zeros(1)}, source="f")
    with pytest.raises(DataError, match=r"f: tensor head.bias has shape \(3,\), the model expects \(2,\)"):
        trainable.load(Parts(), {**state, "head.bias": torch.zeros(3)}, source="f")
    broken = tmp_path / trainable.TRAINABLE_FILE
    broken.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="cannot be read as safetensors"):
        trainable.read(broken)
    with pytest.raises(DataError, match="not found"):
        trainable.read(tmp_path / "missing.safetensors")


def test_schedule_warm_up_conventions():
    lr = lambda s: warmup_then_decay(s, peak=1.0, warmup_steps=4, total_steps=12, decay="linear", offset=1)
    lam = lambda s: warmup_then_decay(s, peak=2.0, warmup_steps=4, total_steps=12, decay="linear", offset=0)
    assert [lr(s) for s in (0, 3, 4, 8, 12)] == [0.25, 1.0, 1.0, 0.5, 0.0]  # step 0 already moves
    assert [lam(s) for s in (0, 3, 4, 8, 12)] == [0.0, 1.5, 2.0, 1.0, 0.0]  # lambda starts at exactly 0
    with pytest.raises(ValueError, match="unknown decay 'step'"):
        warmup_then_decay(5, peak=1.0, warmup_steps=0, total_steps=10, decay="step", offset=0)


def test_right_pad_keeps_rows_and_pads_on_the_right():
    assert right_pad([[5, 6, 7], [8], []], 1).tolist() == [[5, 6, 7], [8, 1, 1], [1, 1, 1]]


def test_train_state_reads_a_state_json_of_any_version():
    saved = {"step": 4, "task_pos": 16, "align_pos": 0, "micro": 4, "bad_steps": 1, "best_score": 2.5,
             "evals_without_improvement": 0, "best_step": 2, "from_a_later_version": True}
    state = TrainState.from_json(saved)
    assert (state.step, state.task_pos, state.bad_steps, state.best_score, state.best_step) == (4, 16, 1, 2.5, 2)
    assert TrainState.from_json({"step": 3}) == TrainState(step=3)
