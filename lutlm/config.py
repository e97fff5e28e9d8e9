"""Model hyper-parameters, shared by every loader (GGUF, Hugging Face folder, packed folder).

Every field is checked when a ModelConfig is made (its type, its range, and an upper limit no
real model comes near), so that a loader that hands over what a file says gets a ConfigError
naming the field and the value expected, never a ZeroDivisionError or a model of 10^9 layers.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field

# Upper limits: far above any published Llama-family model (Llama 3.1 405B: hidden 16384,
# intermediate 53248, 126 layers, 128 heads, vocabulary 128256), far below what would exhaust memory.
LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 19,
    "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 31,
}
ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config field that makes no model: `field` (the ModelConfig name) and what is wrong with it."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name} {problem}")
        self.field = field_name
        self.problem = problem


def shown(value, limit: int = 60) -> str:
    """A value for a one-line message, cut short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """A number that a float holds exactly enough: not nan, not inf, not an int beyond float range."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int of hundreds of digits, as JSON may spell one
        return False


def check_count(name: str, value, low: int = 1) -> None:
    high = LIMITS[name]
    if not is_whole(value) or not low <= value <= high:
        raise ConfigError(name, f"is {shown(value)}; expected a whole number from {low} to {high}")


def check_positive(name: str, value) -> None:
    if not is_finite(value) or value <= 0:
        raise ConfigError(name, f"is {shown(value)}; expected a finite number > 0")


def check_rope_scaling(scaling) -> None:
    """What lutlm.model.rope_inverse_frequencies reads: a type it knows and finite factors."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError("rope_scaling", f"is {shown(scaling)}; expected an object or null")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError("rope_scaling", f"type is {shown(kind)}; lutlm supports {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return
    if not is_finite(scaling.get("factor")) or scaling["factor"] <= 0:
        raise ConfigError("rope_scaling", f"factor is {shown(scaling.get('factor'))}; expected a finite number > 0")
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            value = scaling.get(key, 1.0)
            if not is_finite(value) or value <= 0:
                raise ConfigError("rope_scaling", f"{key} is {shown(value)}; expected a finite number > 0")
        if scaling.get("low_freq_factor", 1.0) == scaling.get("high_freq_factor", 4.0):
            raise ConfigError("rope_scaling", "low_freq_factor equals high_freq_factor; expected them to differ")


@dataclass
class ModelConfig:
    """A Llama-family decoder. Field names follow Hugging Face's LlamaConfig where one exists."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    architecture: str = "llama"
    name: str = ""
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            check_count(name, getattr(self, name))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_count("head_dim", self.head_dim, low=2)
        if self.head_dim % 2:  # the rotary embedding turns pairs of a head's dimensions
            raise ConfigError("head_dim", f"is {self.head_dim}; expected an even number")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_key_value_heads",
                f"is {self.num_key_value_heads}; expected a divisor of num_attention_heads ({self.num_attention_heads})",
            )
        check_positive("rms_norm_eps", self.rms_norm_eps)
        check_positive("rope_theta", self.rope_theta)
        self.rms_norm_eps, self.rope_theta = float(self.rms_norm_eps), float(self.rope_theta)
        check_rope_scaling(self.rope_scaling)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError("tie_word_embeddings", f"is {shown(self.tie_word_embeddings)}; expected true or false")
        for name in ("architecture", "name"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(name, f"is {shown(getattr(self, name))}; expected a string")
        if self.bos_token_id is not None and not (is_whole(self.bos_token_id) and 0 <= self.bos_token_id < self.vocab_size):
            raise ConfigError("bos_token_id", f"is {shown(self.bos_token_id)}; expected a token id from 0 to "
                                              f"{self.vocab_size - 1} or null")
        if not isinstance(self.eos_token_ids, list) or not all(is_whole(i) and i >= 0 for i in self.eos_token_ids):
            raise ConfigError("eos_token_ids", f"is {shown(self.eos_token_ids)}; expected a list of token ids")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config a dict describes (unknown keys ignored); a missing required field is a ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError("config", f"is {shown(d)}; expected an object")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        required = [name for name, f in cls.__dataclass_fields__.items()
                    if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in known]
        if missing:
            raise ConfigError(missing[0], "is missing; expected a whole number >= 1")
        return cls(**known)
