import math

import pytest
import torch
from torch import nn

from pdclip.schedules import lr_at
from pdclip.teacher import EmaTeacher


def test_lr_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 100, 1e-3, 10, min_lr=1e-5) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[100] == pytest.approx(1e-5)
    assert lr_at(55, 100, 1e-3, 10) == pytest.approx(0.5e-3)  # half-way through the cosine


def test_ema_teacher_follows_the_decay_warmup():
    student = nn.Linear(3, 2)
    teacher = EmaTeacher(student, decay=0.999)
    assert not any(p.requires_grad for p in teacher.module.parameters())
    start = teacher.module.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update(student)  # n = 0: d = 1/10
    torch.testing.assert_close(teacher.module.weight, start + 0.9)
    for _ in range(9999):
        teacher.update(student)
    assert teacher.current_decay() == 0.999  # the warm-up reaches the cap at n = 8991
    torch.testing.assert_close(teacher.module.weight, student.weight)


def test_ema_teacher_state_round_trips():
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = EmaTeacher(student, decay=0.99)
    teacher.update(student)
    other = EmaTeacher(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    other.load_state_dict(teacher.state_dict())
    assert other.num_updates == 1 and math.isclose(other.decay, 0.99)
    torch.testing.assert_close(other.module[0].weight, teacher.module[0].weight)


def test_ema_teacher_shares_frozen_parameters_and_averages_the_rest():
    student = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    student[0].requires_grad_(False)  # e.g. a frozen pretrained text tower
    teacher = EmaTeacher(student)
    assert teacher.module[0].weight is student[0].weight
    assert teacher.module[1].weight is not student[1].weight
    assert student[1].weight.requires_grad  # freezing the teacher leaves the student trainable
    with torch.no_grad():
        student[1].weight.add_(1.0)
    before = teacher.module[1].weight.clone()
    teacher.update(student)
    torch.testing.assert_close(teacher.module[1].weight, before + 0.9)


class _Tokenizer:
    """Stands for a Hugging Face tokenizer: state that is not learned, costly to copy."""

    def __deepcopy__(self, memo):
        raise AssertionError("the teacher deep-copied the tokenizer")


def test_teacher_shares_the_tokenizers_instead_of_copying_them():
    student = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    student.tokenizer, student[1].hf_tokenizer = _Tokenizer(), _Tokenizer()
    teacher = EmaTeacher(student)
    assert teacher.module.tokenizer is student.tokenizer and teacher.module[1].hf_tokenizer is student[1].hf_tokenizer
    assert teacher.module[1].weight is not student[1].weight
