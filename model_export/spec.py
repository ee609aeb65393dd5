"""What a model is: its kind, dimensions and training knobs, saved next to its weights as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from infra.cli import UserError
from infra.files import write_text_atomically

MODEL_KINDS = ("mostpop", "youtube_dnn", "mind", "mind_remi")


# The ModelSpec fields `train` sets from a flag, with the kinds whose model reads each: a flag given for
# another kind is refused (it would be saved in spec.json and change nothing).
KNOB_FLAGS = {
    "dim": ("--dim", ("youtube_dnn", "mind", "mind_remi")),
    "n_interests": ("--interests", ("youtube_dnn", "mind", "mind_remi")),  # youtube_dnn: 1 only (ModelSpec)
    "attention_power": ("--power", ("mind", "mind_remi")),  # the label-aware attention
    "hard_negative_beta": ("--beta", ("mind_remi",)),
    "routing_regularization": ("--rr-lambda", ("mind_remi",)),
}


# The largest label-aware attention power: sign(s)|s|^p is computed in float64 with |s| capped at
# 10^(300/p) (mind.label_aware_attention); at p = 64 the cap is ~49,000, far above any score, while a
# larger p would tie every score above a smaller cap (at p = 1000: 2) and average those interests.
MAX_ATTENTION_POWER = 64.0


class SpecError(UserError, ValueError):
    """A model's settings contradict each other or the model kind; the message says which flag to change."""


@dataclass
class ModelSpec:
    kind: str  # one of MODEL_KINDS
    n_items: int
    dim: int = 64  # embedding and interest dimension
    n_interests: int = 4  # K, the most interests a user gets (MIND: dynamic K_u <= K)
    maxlen: int = 20  # behaviours the user tower reads
    routing_iterations: int = 3
    routing_seed: int = 7  # fixes the initial routing logits at inference (deterministic serving)
    routing_init_std: float = 0.1  # b_ij ~ N(0, std^2): random (not zero) so capsules can differ; 0.1 chosen on validation
    attention_power: float = 2.0  # p of the label-aware attention
    profile_dim_per_field: int = 16
    hidden_multiplier: int = 4  # width of the ReLU layer after concatenating the profile: multiplier * dim
    n_side_tokens: int = 0
    profile_cardinalities: list[int] = field(default_factory=list)
    # REMI (Xie et al. 2023); both 0 for plain MIND
    hard_negative_beta: float = 0.0  # IHN: weight of the interest-aware hard negatives
    routing_regularization: float = 0.0  # RR: lambda of the routing-matrix variance penalty

    @staticmethod
    def refuse_unread_knobs(kind: str, given: dict) -> None:
        """`given`: field -> a flag's value (None: not given). SpecError for a flag the kind's model does not read."""
        for name, value in given.items():
            if value is not None and name in KNOB_FLAGS and kind not in KNOB_FLAGS[name][1]:
                flag, kinds = KNOB_FLAGS[name]
                raise SpecError(f"{flag} is a knob of {' / '.join(kinds)}, not of {kind}: leave it out, or train another --model")

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise SpecError(f"unknown model kind {self.kind!r}; choose one of {', '.join(MODEL_KINDS)}")
        if self.kind == "youtube_dnn" and self.n_interests != 1:
            raise SpecError(f"youtube_dnn has one user vector, not {self.n_interests} interests: leave --interests out, or train mind / mind_remi")
        if self.attention_power > MAX_ATTENTION_POWER:
            raise SpecError(f"attention_power {self.attention_power} is above {MAX_ATTENTION_POWER:g}: its scores would be capped "
                            f"below overflow and tie, which averages the interests instead of picking one; {MAX_ATTENTION_POWER:g} "
                            "is already hard attention for scores over 1 (--power)")
        for name in ("attention_power", "hard_negative_beta", "routing_regularization"):
            value = getattr(self, name)
            if not (0 <= value < math.inf):
                raise SpecError(f"{name} must be a finite number >= 0, not {value}")
        if self.kind != "mind_remi" and (self.hard_negative_beta or self.routing_regularization):
            raise SpecError(f"REMI's hard negatives (--beta) and routing regularisation (--rr-lambda) are knobs of mind_remi, not of {self.kind}: "
                            "train --model mind_remi, or leave them out")

    @property
    def is_multi_interest(self) -> bool:
        return self.kind in ("mind", "mind_remi")

    def save(self, path: Path) -> None:
        write_text_atomically(path, json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "ModelSpec":
        return cls(**json.loads(path.read_text()))
