import pytest
import torch
from torch import nn

from recsys.training.ema import EmaTeacher


def test_ema_update_is_exact_and_teacher_gets_no_gradient() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = EmaTeacher(student, decay_rate=0.25)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(8, 3))  # moves the BatchNorm running statistics
    teacher.update(student)
    for name, theta in student.named_parameters():
        expected = 0.75 * before[name] + 0.25 * theta
        assert torch.equal(teacher.module.state_dict()[name], expected)
    assert torch.equal(teacher.module.state_dict()["1.running_mean"], student.state_dict()["1.running_mean"])
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert not teacher(torch.randn(4, 3)).requires_grad


def test_ema_rate_is_validated() -> None:
    with pytest.raises(ValueError, match="decay_rate"):
        EmaTeacher(nn.Linear(2, 2), decay_rate=0.0)
