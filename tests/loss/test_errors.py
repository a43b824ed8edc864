"""Bad input gets a clear error naming the argument and what was expected, before any kernel runs."""

import re

import pytest
import torch

import kdfast

S = torch.randn(4, 10)
T = torch.randn(4, 10)
LABELS = torch.tensor([1, 2, -100, 3])

CASES = [
    # (description, args, kwargs, exception, message pattern)
    ("not a tensor", ([[1.0]], T), {}, TypeError, "student_logits must be a torch.Tensor"),
    ("integer logits", (S.long(), T), {}, TypeError, r"student_logits must be a floating-point.*int64"),
    ("complex logits", (S, T.to(torch.complex64)), {}, TypeError,
     r"teacher_logits must be a floating-point.*complex64"),
    ("0-d logits", (torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, r"shape \(\.\.\., V\)"),
    ("row mismatch", (S, torch.randn(5, 10)), {}, ValueError, r"\(4, 10\) and teacher_logits \(5, 10\)"),
    ("vocab mismatch", (S, torch.randn(4, 12)), {}, ValueError, r"V=10.*V=12.*vocab_size=10"),
    ("vocab_size too large", (S, T), {"vocab_size": 11}, ValueError, "vocab_size=11 exceeds"),
    ("vocab_size not positive", (S, T), {"vocab_size": 0}, ValueError, "vocab_size must be None or a positive int"),
    ("empty vocabulary", (torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, r"empty vocabulary.*V=0"),
    ("temperature zero", (S, T), {"temperature": 0.0}, ValueError, r"temperature must be finite and > 0, got 0.0"),
    ("temperature negative", (S, T), {"temperature": -1}, ValueError, "temperature must be finite and > 0"),
    ("temperature nan", (S, T), {"temperature": float("nan")}, ValueError, "temperature must be finite"),
    ("temperature inf", (S, T), {"temperature": float("inf")}, ValueError, "temperature must be finite"),
    ("temperature tensor", (S, T), {"temperature": torch.tensor(2.0)}, TypeError, "temperature must be a real number"),
    ("temperature bool", (S, T), {"temperature": True}, TypeError, "temperature must be a real number"),
    ("teacher_temperature zero", (S, T), {"teacher_temperature": 0}, ValueError,
     r"teacher_temperature must be finite and > 0 \(or None\), got 0.0"),
    ("teacher_temperature negative", (S, T), {"teacher_temperature": -2.0}, ValueError,
     "teacher_temperature must be finite and > 0"),
    ("teacher_temperature nan", (S, T), {"teacher_temperature": float("nan")}, ValueError,
     "teacher_temperature must be finite"),
    ("teacher_temperature inf", (S, T), {"teacher_temperature": float("inf")}, ValueError,
     "teacher_temperature must be finite"),
    ("teacher_temperature string", (S, T), {"teacher_temperature": "1"}, TypeError,
     "teacher_temperature must be a real number"),
    ("beta above 1", (S, T), {"divergence": "jsd", "beta": 1.5}, ValueError, r"beta must be finite and in \[0, 1\]"),
    ("beta negative", (S, T), {"beta": -0.1}, ValueError, r"beta must be finite and in \[0, 1\]"),
    ("unknown divergence", (S, T), {"divergence": "kl"}, ValueError, "divergence must be one of 'forward_kl'"),
    ("unknown reduction", (S, T), {"reduction": "avg"}, ValueError, "reduction must be one of 'batchmean'"),
    ("unknown backend", (S, T), {"backend": "tpu"}, ValueError, "backend must be one of 'auto'"),
    ("negative weight", (S, T), {"hard_weight": -1.0, "labels": LABELS}, ValueError,
     "hard_weight must be finite and >= 0"),
    ("hard weight without labels", (S, T), {"hard_weight": 0.5}, ValueError, "hard_weight=0.5 needs labels"),
    ("labels wrong shape", (S, T), {"labels": LABELS[:3]}, ValueError,
     r"labels must have one entry per row of logits: the leading \(token\) shape \(4,\) \(4 rows\), got shape "
     r"\(3,\) \(3 entries\); reshape them to \(4,\)"),
    ("labels float", (S, T), {"labels": LABELS.float()}, TypeError, "labels must be an int64"),
    ("labels not a tensor", (S, T), {"labels": [1, 2, 3, 4]}, TypeError, "labels must be a torch.Tensor"),
    ("label out of range", (S, T), {"labels": torch.tensor([1, 10, 2, 3]), "hard_weight": 1.0}, ValueError,
     r"labels must lie in \[0, 10\) or equal ignore_index=-100; found 10"),
    ("ignore_index not int", (S, T), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ("scale_t2 not bool", (S, T), {"scale_t2": 1}, TypeError, "scale_t2 must be True or False"),
    ("backend cpu on float64", (S.double(), T.double()), {"backend": "cpu"}, ValueError,
     r"backend='cpu' takes logits of dtype float32, bfloat16, float16, got torch.float64"),
]


@pytest.mark.parametrize("description,args,kwargs,exception,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(description, args, kwargs, exception, pattern):
    with pytest.raises(exception, match=pattern):
        kdfast.kd_loss(*args, **kwargs)


def test_module_validates_its_options_at_construction():
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        kdfast.KDLoss(temperature=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        kdfast.KDLoss(temprature=2.0)


def test_logits_on_different_devices_are_an_error():
    meta = torch.randn(4, 10, device="meta")
    with pytest.raises(ValueError, match="student_logits is on cpu but teacher_logits is on meta"):
        kdfast.kd_loss(S, meta)


def test_labels_on_another_device_are_an_error():
    with pytest.raises(ValueError, match="labels are on meta but the inputs are on cpu"):
        kdfast.kd_loss(S, T, labels=torch.zeros(4, dtype=torch.long, device="meta"))


def test_unavailable_backend_says_why():
    status = kdfast.available_backends()
    for name, info in status.items():
        if info.available:
            continue
        with pytest.raises((RuntimeError, ValueError), match=f"backend='{name}'"):
            kdfast.kd_loss(S, T, backend=name)


def test_cuda_backends_reject_cpu_tensors_with_a_hint():
    if kdfast.available_backends()["cuda"].available:
        with pytest.raises(ValueError, match=r"backend='cuda' runs on cuda tensors.*use backend='auto'"):
            kdfast.kd_loss(S, T, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given where no GPU can be used")
def test_cuda_backend_says_why_it_is_missing():
    info = kdfast.available_backends()["cuda"]
    assert not info.available
    assert re.search("torch was built without CUDA|no CUDA device", info.reason), info.reason


def test_available_backends_reports_every_backend():
    status = kdfast.available_backends()
    assert set(status) == {"triton", "cuda", "cpu", "torch"}
    assert status["torch"].available
    for info in status.values():
        assert info.reason


def test_sparse_losses_refuse_teacher_temperature():
    ids, logprobs = torch.tensor([[0, 1]] * 4), torch.full((4, 2), -1.0)
    message = "teacher_temperature does not apply to a sparse teacher"
    with pytest.raises(ValueError, match=message):
        kdfast.SparseKDLoss(teacher_temperature=1.0)
    with pytest.raises(ValueError, match=message):
        kdfast.fused_linear_sparse_kd_loss(torch.randn(4, 3), torch.randn(10, 3), ids, logprobs,
                                           teacher_temperature=1.0)


def test_sparse_losses_refuse_tvd():
    ids, logprobs = torch.tensor([[0, 1]] * 4), torch.full((4, 2), -1.0)
    with pytest.raises(ValueError, match="divergence='tvd' is not supported by the sparse losses"):
        kdfast.sparse_kd_loss(S, ids, logprobs, divergence="tvd")
