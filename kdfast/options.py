"""The options every kdfast loss takes, validated once: :class:`LossOptions`.

Each option is checked with an error that names it and the value expected, before any
tensor is touched. ``loss_options`` turns a function's ``**options`` into LossOptions with
an error for a misspelt name that names the function the user called.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from numbers import Real
from typing import Optional

from .backends import DIVERGENCE_CODES, FORWARD_KL, REVERSE_KL, KernelParams
from .backends.registry import BACKENDS

DIVERGENCES = tuple(DIVERGENCE_CODES)
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def check_number(name: str, value, expected: str, ok) -> float:
    """value as a float, if it is a finite real number for which ok(value) holds."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number {expected}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be finite and {expected}, got {value}")
    return value


def check_positive_int(name: str, value, allow_none: bool = False) -> None:
    """An int >= 1 (bools are not ints here), or None when allowed."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}a positive int, got {value!r}")


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_side_pair(name: str, value) -> Optional[tuple[Optional[float], Optional[float]]]:
    """A per-side option: None (off), one positive number for both sides, or a (student, teacher) pair
    whose entries are positive numbers or None; as None or a (student, teacher) pair of floats or None."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)):
        value = check_number(name, value, "> 0 (or None)", lambda x: x > 0)
        return value, value
    if len(value) != 2:
        raise ValueError(f"{name} must be None, a positive number, or a (student, teacher) pair, got {value!r}")
    checked = tuple(None if v is None else check_number(f"{name}[{i}] (the {side}'s)", v, "> 0 (or None)",
                                                        lambda x: x > 0)
                    for i, (side, v) in enumerate(zip(("student", "teacher"), value)))
    return None if checked == (None, None) else checked


@dataclass(frozen=True)
class LossOptions:
    """The keyword options of kd_loss and the fused-linear loss, validated at construction."""

    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    ignore_index: int = -100
    reduction: str = "batchmean"
    scale_t2: bool = True
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    vocab_size: Optional[int] = None
    inplace_backward: bool = False
    expected_grad_output: float = 1.0
    backend: str = "auto"
    teacher_temperature: Optional[float] = None  # None: temperature
    softcap: Optional[tuple] = None  # per side (check_side_pair): z -> cap tanh(z / cap)
    logit_scale: Optional[tuple] = None  # per side: z -> scale z, before the soft cap

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: store the normalised values
        set_(self, "temperature", check_number("temperature", self.temperature, "> 0", lambda v: v > 0))
        if self.teacher_temperature is not None:  # kept None, so that "not given" stays visible
            set_(self, "teacher_temperature",
                 check_number("teacher_temperature", self.teacher_temperature, "> 0 (or None)", lambda v: v > 0))
        for name in ("softcap", "logit_scale"):
            set_(self, name, check_side_pair(name, getattr(self, name)))
        check_choice("divergence", self.divergence, DIVERGENCES)
        set_(self, "beta", check_number("beta", self.beta, "in [0, 1]", lambda v: 0 <= v <= 1))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        check_choice("reduction", self.reduction, REDUCTIONS)
        for flag in ("scale_t2", "inplace_backward"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        for weight in ("hard_weight", "soft_weight"):
            set_(self, weight, check_number(weight, getattr(self, weight), ">= 0", lambda v: v >= 0))
        check_positive_int("vocab_size", self.vocab_size, allow_none=True)
        set_(self, "expected_grad_output",
             check_number("expected_grad_output", self.expected_grad_output, "> 0", lambda v: v > 0))
        check_choice("backend", self.backend, ("auto", *BACKENDS))

    def as_kwargs(self) -> dict:
        """The options as keyword arguments of the public loss functions."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def kernel_params(self) -> KernelParams:
        divergence = DIVERGENCE_CODES[self.divergence]
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):  # the GKD / Liger convention
            divergence = FORWARD_KL if self.beta == 0.0 else REVERSE_KL
        teacher_temperature = self.temperature if self.teacher_temperature is None else self.teacher_temperature
        return KernelParams(self.temperature, teacher_temperature, divergence, self.beta, self.ignore_index,
                            self.hard_weight > 0, *self.logit_transforms("student"), *self.logit_transforms("teacher"))

    def logit_transforms(self, side: str) -> tuple[float, float]:
        """(scale, cap) of one side's logits as the kernels take them: 1.0 and 0.0 when off."""
        index = ("student", "teacher").index(side)
        scale = self.logit_scale[index] if self.logit_scale is not None else None
        cap = self.softcap[index] if self.softcap is not None else None
        return (1.0 if scale is None else scale), (0.0 if cap is None else cap)

    @property
    def kd_scale(self) -> float:
        """What the per-row divergence is multiplied by: T**2 when scale_t2."""
        return self.temperature**2 if self.scale_t2 else 1.0


OPTION_NAMES = tuple(f.name for f in fields(LossOptions))


def loss_options(function: str, options: dict, other_keywords: tuple[str, ...] = ()) -> LossOptions:
    """LossOptions(**options) for a call of ``function``, whose error for an unknown option names
    that function, the closest valid name and every valid one."""
    unknown = [key for key in options if key not in OPTION_NAMES]
    if unknown:
        valid = sorted(OPTION_NAMES + other_keywords)
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}{hint} "
                        f"(valid keywords: {', '.join(valid)})")
    return LossOptions(**options)
