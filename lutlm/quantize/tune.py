"""End-to-end tuning of a quantized model's grids, by distillation from the source model.

The layer-wise quantizers (RTN, AWQ, GPTQ) each minimize one linear's output error on its own;
on a small model their errors compound through the layers, and a smaller layer-wise error no
longer means a lower perplexity (on SmolLM2 at 4 bits, a least-squares refit of the scales
that lowered every layer's output error by ~3% raised perplexity). This step, in the spirit of
EfficientQAT's end-to-end training of quantization parameters (Chen et al., 2024), keeps every
integer code as quantized and tunes, through the whole model at once,

    each group's scale s (as s0 * exp(a), so that it stays positive and moves in ratios),
    each group's zero z (in code units, as stored),
    the RMSNorm weights (float tensors of the packed folder already: AWQ folds scales there),

to minimize KL(source || quantized) of the next-token distributions on the calibration
sequences. Matching the source model, not the calibration text's labels, keeps the tuned
model an approximation of the source rather than a model fine-tuned to that text. The format,
and so the bits per weight, is unchanged: scales and zeros are rounded to fp16 as stored.

Cost: one forward pass of the source and a forward and backward pass of the quantized model per
step (about 10 s per step of 2 x 512 tokens for SmolLM2-135M on 2 cores); memory: the model in
fp32 with its activations for backpropagation, so this is meant for models of a few hundred
million parameters on a CPU.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lutlm.formats import Checkpoint
from lutlm.formats.packed import PackedWeight
from lutlm.quantize.calibration import CalibrationSet

SEQUENCES_PER_STEP = 2
LEARNING_RATES = {"log_scale": 1e-3, "zero": 1e-2, "norm": 1e-4}  # Adam; zero in code units


class TunableLinear(nn.Module):
    """A packed weight whose codes are fixed and whose grid (scale, zero per group) is trainable."""

    def __init__(self, packed: PackedWeight):
        super().__init__()
        n, k, g = packed.out_features, packed.in_features, packed.group_size
        self.packed = packed
        self.register_buffer("codes", packed.codes().view(n, k // g, g))  # uint8: a quarter of fp32's memory
        self.register_buffer("scale0", packed.scales.float().unsqueeze(-1))
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        self.zero = nn.Parameter(packed.zeros.float().unsqueeze(-1))

    def scale(self) -> torch.Tensor:
        return self.scale0 * self.log_scale.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.scale() * (self.codes.float() - self.zero)
        return F.linear(x, weight.view(self.packed.out_features, self.packed.in_features))

    def tuned(self) -> PackedWeight:
        """The packed weight with the tuned grid, rounded to fp16 as the format stores it."""
        return dataclasses.replace(self.packed, scales=self.scale().detach().squeeze(-1).half(),
                                   zeros=self.zero.detach().squeeze(-1).half())


def is_norm(name: str) -> bool:
    return name == "model.norm" or name.endswith("layernorm")


def kl_to_source(source_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(source || model) of the next-token distributions."""
    source = F.log_softmax(source_logits, -1)
    return F.kl_div(F.log_softmax(logits, -1), source, log_target=True, reduction="none").sum(-1).mean()


def tune_grids(checkpoint: Checkpoint, packed: dict[str, PackedWeight], float_tensors: dict[str, torch.Tensor],
               calibration: CalibrationSet, steps: int, progress: bool = True
               ) -> tuple[dict[str, PackedWeight], dict[str, torch.Tensor]]:
    """Tune the grids of `packed` and the norm weights (from `float_tensors` where the quantizer
    changed them, else the source's) for `steps` steps; returns both, tuned. The source
    checkpoint is not modified."""
    from lutlm.loader import build_model

    source = build_model(checkpoint)
    model = build_model(checkpoint)
    others = [name for name in float_tensors if not is_norm(name.removesuffix(".weight"))]
    if others:
        raise ValueError(f"grid tuning takes the quantizer's norm weights only, not {', '.join(others)}")
    tunable = {}
    for name, weight in packed.items():
        parent, _, child = name.rpartition(".")
        tunable[name] = TunableLinear(weight)
        setattr(model.get_submodule(parent) if parent else model, child, tunable[name])
    for p in model.parameters():
        p.requires_grad_(False)
    norms = {}
    for name, m in model.named_modules():
        if is_norm(name):  # new tensors: the models share the checkpoint's storage
            start = float_tensors.get(f"{name}.weight", m.weight.detach())
            m.weight = nn.Parameter(start.float().clone())
            norms[name] = m.weight
    groups = {
        "log_scale": [t.log_scale for t in tunable.values()],
        "zero": [t.zero for t in tunable.values()],
        "norm": list(norms.values()),
    }
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": params, "lr": LEARNING_RATES[key]} for key, params in groups.items()])

    tokens = calibration.tokens
    seq_len = tokens.shape[1]
    source.setup_cache(SEQUENCES_PER_STEP, seq_len)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))
    bar = tqdm(range(steps), desc="tuning grids (KL to the source)", unit="step", disable=not progress)
    for step in bar:
        batch = tokens[order[(torch.arange(SEQUENCES_PER_STEP) + step * SEQUENCES_PER_STEP) % len(tokens)]]
        with torch.no_grad():
            source_logits = source(batch, 0)
        # A fresh KV cache each step: the model writes its keys and values there, and the old
        # buffers would keep the previous step's autograd graph.
        model.max_batch = 0
        model.setup_cache(SEQUENCES_PER_STEP, seq_len)
        loss = kl_to_source(source_logits, model(batch, 0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(kl=f"{loss.item():.4f}")

    tuned_floats = dict(float_tensors)
    for name, weight in norms.items():
        dtype = checkpoint.tensors[f"{name}.weight"].dtype
        tuned_floats[f"{name}.weight"] = weight.detach().to(dtype)
    return {name: t.tuned() for name, t in tunable.items()}, tuned_floats
