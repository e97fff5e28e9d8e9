"""End-to-end tuning of a quantized model's grids, by distillation from the source model.

The layer-wise quantizers (RTN, AWQ, GPTQ) each minimize one linear's output error on its own;
on a small model their errors compound through the layers, and a smaller layer-wise error no
longer means a lower perplexity. This step, in the spirit of EfficientQAT's end-to-end training
of quantization parameters (Chen et al., 2024), tunes through the whole model at once

    each group's scale s (as s0 * exp(a), so that it stays positive and moves in ratios),
    each group's zero z (in code units, as stored),
    the RMSNorm weights (float tensors of the packed folder already: AWQ folds scales there),

and, with `train_codes`, the integer codes themselves (each weight's code plus a trained
offset, rounded in the forward pass and passed through as the identity in the backward pass:
a straight-through estimator, as in EfficientQAT's block-wise phase), to minimize
KL(source || quantized) of the next-token distributions on the calibration sequences, with
Adam and a cosine decay of the learning rates to zero. Matching the source model, not the
calibration text's labels, keeps the tuned model an approximation of the source rather than
a model fine-tuned to that text. The format, and so the bits per weight, is unchanged: scales
and zeros are rounded to fp16 as stored, codes stay in 0 .. 2^b - 1.

Long runs memorize the calibration text, so `generated` adds sequences sampled from the source
model itself, each continuing PROMPT_TOKENS tokens from a random place in the calibration text,
as LLM-QAT (Liu et al., 2023) distills on the full-precision model's own generations: a pool
many times the calibration text's size, in the distribution the source defines.

Cost: one forward pass of the source and a forward and backward pass of the quantized model per
step. On a GPU the matrix products run in TF32 (tf32_matmuls) and sampling decodes
SAMPLING_BATCH_CUDA sequences at once. Memory: the model in fp32 with its activations for
backpropagation, so this is meant for models of a few hundred million parameters (a GPU takes
larger ones). What it buys, and what it costs, measured: docs/quantization.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lutlm.formats import Checkpoint
from lutlm.formats.packed import PackedWeight, pack_planes
from lutlm.quantize.calibration import CalibrationSet
from lutlm.quantize.config import DEFAULT_CODE_LR

LEARNING_RATES = {"log_scale": 1e-3, "zero": 1e-2, "norm": 1e-4}  # Adam; the zero in code units
PROMPT_TOKENS = 8  # calibration tokens that each sampled sequence continues (after the first token)
SAMPLING_BATCH_CUDA = 1024  # sequences sampled at once on a GPU: a 24 GB KV cache for SmolLM2


class TunableLinear(nn.Module):
    """A packed weight whose grid (scale, zero per group) is trainable, and whose codes are
    fixed or, with `train_codes`, move by a trained offset rounded through a straight-through
    estimator (the forward pass uses the rounded codes; gradients pass the rounding as if it
    were the identity)."""

    def __init__(self, packed: PackedWeight, train_codes: bool = False):
        super().__init__()
        n, k, g = packed.out_features, packed.in_features, packed.group_size
        self.packed = packed
        self.register_buffer("codes0", packed.codes().view(n, k // g, g))  # uint8: a quarter of fp32's memory
        self.register_buffer("scale0", packed.scales.float().unsqueeze(-1))
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        self.zero = nn.Parameter(packed.zeros.float().unsqueeze(-1))
        self.code_offset = nn.Parameter(torch.zeros(n, k // g, g)) if train_codes else None

    def scale(self) -> torch.Tensor:
        return self.scale0 * self.log_scale.exp()

    def codes(self) -> torch.Tensor:
        if self.code_offset is None:
            return self.codes0.float()
        moved = self.codes0.float() + self.code_offset
        return (moved + (moved.round() - moved).detach()).clamp(0, (1 << self.packed.bits) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.scale() * (self.codes() - self.zero)
        return F.linear(x, weight.view(self.packed.out_features, self.packed.in_features))

    def tuned(self) -> PackedWeight:
        """The packed weight with the tuned grid and codes, rounded to fp16 as the format stores it."""
        n, k = self.packed.out_features, self.packed.in_features
        with torch.no_grad():
            planes = pack_planes(self.codes().view(n, k).to(torch.uint8), self.packed.bits)
            return dataclasses.replace(self.packed, planes=planes.cpu(), scales=self.scale().squeeze(-1).half().cpu(),
                                       zeros=self.zero.squeeze(-1).half().cpu())


def is_norm(name: str) -> bool:
    return name == "model.norm" or name.endswith("layernorm")


@contextlib.contextmanager
def tf32_matmuls(device: str):
    """On CUDA, float32 matrix products on the tensor cores in TF32 (10-bit mantissa, fp32 range
    and accumulation) for the duration: the KL and its gradients need no more, and the step is
    compute-bound there. The previous setting is restored; other devices are left alone."""
    previous = torch.get_float32_matmul_precision()
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def kl_to_source(source_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(source || model) of the next-token distributions."""
    source = F.log_softmax(source_logits, -1)
    return F.kl_div(F.log_softmax(logits, -1), source, log_target=True, reduction="none").sum(-1).mean()


@torch.no_grad()
def sample_from_source(source: nn.Module, calibration: CalibrationSet, count: int, device: str = "cpu",
                       seed: int = 0, progress: bool = True) -> torch.Tensor:
    """`count` sequences [count, seq_len] as long as the calibration's, sampled from `source` (on
    `device`) at temperature 1: each starts with the calibration sequences' first token (BOS,
    where the tokenizer adds one) and PROMPT_TOKENS tokens from a random place in the calibration
    text, and continues with tokens drawn from the source's full next-token distribution."""
    n, seq_len = calibration.tokens.shape
    if seq_len <= PROMPT_TOKENS + 1:
        raise ValueError(f"sampling tuning sequences needs calibration sequences longer than "
                         f"{PROMPT_TOKENS + 1} tokens, got {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(n, (count,), generator=generator)
    starts = torch.randint(1, seq_len - PROMPT_TOKENS + 1, (count,), generator=generator)
    prompt = calibration.tokens[rows[:, None], starts[:, None] + torch.arange(PROMPT_TOKENS)]
    sequences = torch.cat([calibration.tokens[rows, :1], prompt, torch.zeros(count, seq_len - PROMPT_TOKENS - 1,
                                                                            dtype=torch.long)], dim=1).to(device)
    sampler = torch.Generator(device=device).manual_seed(seed)
    # A decode step on a GPU is bound by its launches, so a wider batch samples faster there.
    batch = SAMPLING_BATCH_CUDA if torch.device(device).type == "cuda" else 16
    source.setup_cache(min(batch, count), seq_len)
    bar = tqdm(total=count * (seq_len - PROMPT_TOKENS - 1), desc="sampling tuning sequences from the source",
               unit="token", unit_scale=True, disable=not progress)
    for first in range(0, count, batch):
        rows_now = sequences[first:first + batch]
        logits = source(rows_now[:, :PROMPT_TOKENS + 1], 0, last_logits_only=True)[:, -1]
        for position in range(PROMPT_TOKENS + 1, seq_len):
            rows_now[:, position] = torch.multinomial(logits.softmax(-1), 1, generator=sampler)[:, 0]
            if position + 1 < seq_len:
                logits = source(rows_now[:, position:position + 1], position, last_logits_only=True)[:, -1]
            bar.update(len(rows_now))
    bar.close()
    return sequences


def tune_grids(checkpoint: Checkpoint, packed: dict[str, PackedWeight], float_tensors: dict[str, torch.Tensor],
               calibration: CalibrationSet, steps: int, sequences_per_step: int = 2, train_codes: bool = False,
               code_lr: float = DEFAULT_CODE_LR, generated: int = 0, device: str = "cpu",
               progress: bool = True) -> tuple[dict[str, PackedWeight], dict[str, torch.Tensor]]:
    """Tune the grids of `packed` (and with `train_codes` their codes, at learning rate
    `code_lr` in code units) and the norm weights
    (from `float_tensors` where the quantizer changed them, else the source's) for `steps`
    steps of `sequences_per_step` sequences on `device`, drawn from the calibration sequences
    and `generated` more sampled from the source (sample_from_source); returns both, tuned, in
    CPU memory. The source checkpoint is not modified."""
    from lutlm.loader import build_model

    source = build_model(checkpoint).to(device)
    model = build_model(checkpoint)
    others = [name for name in float_tensors if not is_norm(name.removesuffix(".weight"))]
    if others:
        raise ValueError(f"grid tuning takes the quantizer's norm weights only, not {', '.join(others)}")
    tunable = {}
    for name, weight in packed.items():
        parent, _, child = name.rpartition(".")
        tunable[name] = TunableLinear(weight, train_codes)
        setattr(model.get_submodule(parent) if parent else model, child, tunable[name])
    for p in model.parameters():
        p.requires_grad_(False)
    norms = {}
    for name, m in model.named_modules():
        if is_norm(name):  # new tensors: the models share the checkpoint's storage
            start = float_tensors.get(f"{name}.weight", m.weight.detach())
            m.weight = nn.Parameter(start.float().clone())
            norms[name] = m.weight
    model.to(device)  # moves parameters in place: `tunable` and `norms` still name them
    groups = {
        "log_scale": [t.log_scale for t in tunable.values()],
        "zero": [t.zero for t in tunable.values()],
        "norm": list(norms.values()),
        "code_offset": [t.code_offset for t in tunable.values() if train_codes],
    }
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    rates = {**LEARNING_RATES, "code_offset": code_lr}
    optimizer = torch.optim.Adam([{"params": params, "lr": rates[key]} for key, params in groups.items() if params])
    # Cosine decay to zero: the last steps settle instead of jumping between roundings.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))

    with tf32_matmuls(device):
        tokens = calibration.tokens.to(device)
        if generated:
            tokens = torch.cat([tokens, sample_from_source(source, calibration, generated, device, progress=progress)])
        seq_len = tokens.shape[1]
        source.setup_cache(sequences_per_step, seq_len, fresh=True)  # frees sampling's far wider cache
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0)).to(device)
        in_step = torch.arange(sequences_per_step, device=device)
        bar = tqdm(range(steps), desc="tuning grids (KL to the source)", unit="step", disable=not progress)
        for step in bar:
            batch = tokens[order[(in_step + step * sequences_per_step) % len(tokens)]]
            with torch.no_grad():
                source_logits = source(batch, 0)
            # A fresh KV cache each step: the model writes its keys and values there, and the old
            # buffers would keep the previous step's autograd graph.
            model.setup_cache(sequences_per_step, seq_len, fresh=True)
            loss = kl_to_source(source_logits, model(batch, 0))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(kl=f"{loss.item():.4f}")

    tuned_floats = dict(float_tensors)
    for name, weight in norms.items():
        dtype = checkpoint.tensors[f"{name}.weight"].dtype
        tuned_floats[f"{name}.weight"] = weight.detach().to(dtype).cpu()
    return {name: t.tuned() for name, t in tunable.items()}, tuned_floats
