"""What to quantize and how: one validated description shared by the CLI, the model
quantizer and the packed folder's metadata.

Group sizes run along the input dimension K. A group size must divide K of every layer
it is applied to. SmolLM2's hidden size 576 is not a multiple of 128, so `group_fallback`
states the rule used instead of silently changing it: per layer, the largest multiple of
32 that divides K and is at most the requested size (96 for K = 576 and a request of 128).
The resulting bits per weight are reported from the group sizes actually used.

Ternary weights take no group size: their absmean scale is per tensor, or per group of
`ternary_group` inputs when asked for explicitly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


METHODS = ("rtn", "awq", "gptq", "awq-gptq", "ternary")
CALIBRATED_METHODS = ("awq", "gptq", "awq-gptq")  # those that need calibration activations
SCALING_METHODS = ("awq", "awq-gptq")  # those that search and fold AWQ's input scales
GPTQ_METHODS = ("gptq", "awq-gptq")  # those that round by GPTQ
DEFAULT_CODE_LR = 1e-2  # grid tuning's learning rate of the code offsets (lutlm.quantize.tune)
GROUP_MULTIPLE = 32  # group sizes the kernels handle: multiples of 32, or the whole row
# The widths the quantizers write: the format holds up to 8 bits (GGUF's Q5..Q8 types load
# as they are), but quantizing to them here is not tuned or tested.
QUANTIZE_BITS = (1, 2, 3, 4)
TERNARY_TAKES_NO_GROUP = (
    "ternary quantization takes no group size: its absmean scale is per tensor, "
    "or per group of G inputs with --ternary-group G"
)


@dataclass(frozen=True)
class QuantConfig:
    method: str = "gptq"
    bits: int | None = None  # None: 4, or 2 for ternary (its storage width)
    group_size: int | None = None  # None: one group per row (the whole input dimension)
    symmetric: bool = False
    group_fallback: bool = False
    ternary_group: int | None = None  # ternary only; None: one scale per tensor
    act_order: bool = False  # GPTQ_METHODS only
    damp: float = 0.01  # GPTQ_METHODS only, as a fraction of the Hessian's mean diagonal
    quantize_head: bool = False  # also quantize lm_head (kept in float by default)
    tune_steps: int = 0  # steps of end-to-end grid tuning after quantizing (lutlm.quantize.tune); 0: none
    tune_sequences: int = 2  # calibration sequences per tuning step
    tune_codes: bool = False  # tuning also moves the integer codes (straight-through rounding)
    tune_code_lr: float = DEFAULT_CODE_LR  # Adam's learning rate of the code offsets, in code units
    tune_generated: int = 0  # sequences sampled from the source model added to the tuning data

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.bits is None:
            object.__setattr__(self, "bits", 2 if self.method == "ternary" else 4)
        if self.method == "ternary":
            if self.bits != 2:
                raise ValueError(f"ternary weights are stored in 2 bits; bits={self.bits} does not apply to them")
            if self.group_size is not None:
                raise ValueError(TERNARY_TAKES_NO_GROUP)
            if self.symmetric:
                raise ValueError("ternary weights are symmetric by construction; symmetric does not apply")
        else:
            if self.bits not in QUANTIZE_BITS:
                raise ValueError(
                    f"bits={self.bits} is not supported: lutlm quantizes to {', '.join(map(str, QUANTIZE_BITS))} bits"
                )
            if self.ternary_group is not None:
                raise ValueError(f"ternary_group (--ternary-group) applies to the ternary method, not {self.method}")
        for name in ("group_size", "ternary_group"):
            size = getattr(self, name)
            if size is not None and (size <= 0 or size % GROUP_MULTIPLE):
                raise ValueError(f"{name}={size} is not a positive multiple of {GROUP_MULTIPLE}")
        if self.act_order and self.method not in GPTQ_METHODS:
            raise ValueError(f"act_order (--act-order) applies to {' and '.join(GPTQ_METHODS)}, not {self.method}")
        if self.tune_steps < 0:
            raise ValueError(f"tune_steps={self.tune_steps} must be 0 (no tuning) or more")
        if self.tune_steps and self.ternary:
            raise ValueError("grid tuning (--tune-steps) applies to scale-and-zero grids, not ternary weights")
        if self.tune_sequences < 1:
            raise ValueError(f"tune_sequences={self.tune_sequences} must be at least 1 sequence per step")
        if self.tune_codes and not self.tune_steps:
            raise ValueError("tune_codes (--tune-codes) needs tuning steps (--tune-steps N)")
        if self.tune_generated < 0:
            raise ValueError(f"tune_generated={self.tune_generated} must be 0 (calibration text only) or more")
        if self.tune_generated and not self.tune_steps:
            raise ValueError("tune_generated (--tune-generated) needs tuning steps (--tune-steps N)")
        if not 0 < self.tune_code_lr < float("inf"):
            raise ValueError(f"tune_code_lr={self.tune_code_lr} must be a positive learning rate")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp={self.damp} must lie between 0 and 1 (a fraction of the mean Hessian diagonal)")

    @property
    def ternary(self) -> bool:
        return self.method == "ternary"

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing takes calibration sequences: for activations, or for tuning."""
        return self.method in CALIBRATED_METHODS or self.tune_steps > 0

    def group_size_for(self, layer: str, in_features: int) -> int:
        """The group size used for one layer, or a clear refusal naming the layer and K."""
        requested = self.ternary_group if self.ternary else self.group_size
        if requested is None:
            return in_features
        if in_features % requested == 0:
            return requested
        if self.group_fallback:
            fits = [g for g in range(GROUP_MULTIPLE, requested + 1, GROUP_MULTIPLE) if in_features % g == 0]
            if fits:
                return fits[-1]
            raise ValueError(
                f"{layer}: no multiple of {GROUP_MULTIPLE} up to {requested} divides its input dimension "
                f"K={in_features}"
            )
        raise ValueError(
            f"{layer}: group size {requested} does not divide its input dimension K={in_features}; "
            f"pick a divisor of K, or pass --group-fallback to use the largest multiple of "
            f"{GROUP_MULTIPLE} below it that divides K"
        )

    def describe(self) -> str:
        """A short name for tables and logs, e.g. 'gptq 4-bit g128' or 'ternary per-tensor'."""
        if self.ternary:
            return f"ternary {'per-tensor' if self.ternary_group is None else f'g{self.ternary_group}'}"
        group = "row" if self.group_size is None else f"g{self.group_size}"
        codes = ""
        if self.tune_codes:
            codes = " codes" if self.tune_code_lr == DEFAULT_CODE_LR else f" codes lr {self.tune_code_lr:g}"
        generated = f" gen {self.tune_generated}" if self.tune_generated else ""
        tuned = f"tuned {self.tune_steps}x{self.tune_sequences}{codes}{generated}"
        extras = [flag for flag, on in (("sym", self.symmetric), ("act-order", self.act_order),
                                        (tuned, self.tune_steps)) if on]
        return " ".join([self.method, f"{self.bits}-bit", group, *extras])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, info: dict) -> "QuantConfig":
        """The config back from to_dict's fields in a packed folder's metadata (its other keys,
        such as the source and the calibration slice, are left out)."""
        return cls(**{f.name: info[f.name] for f in fields(cls) if f.name in info})
