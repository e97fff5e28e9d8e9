"""Quantize every linear layer of a Llama checkpoint into lutlm's packed format.

Attention q/k/v/o and MLP gate/up/down of every decoder layer are quantized; lm_head only
when asked (QuantConfig.quantize_head); the embedding and the norms stay in float.

RTN and ternary read the weights alone. AWQ, GPTQ and AWQ-then-GPTQ (AWQ's input scales
searched and folded, then GPTQ's rounding of the scaled weights) run the calibration sequences
through the model one decoder layer at a time, as their reference implementations do:
the layer's linear inputs are recorded, its linears quantized, and its outputs, computed
with the quantized weights, become the next layer's inputs, so each layer is fitted to
the inputs it will really receive. Only that layer's float weights are loaded (besides the
embedding and head, dropped once the first layer's inputs are made unless the head is
quantized), so a model need not fit in memory as float32 to be calibrated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from lutlm.formats import Checkpoint, unpacked_tensors
from lutlm.formats.llama_layout import expected_shapes
from lutlm.formats.packed import PackedWeight, check_config
from lutlm.formats.packed_model import packed_type_name
from lutlm.quantize.awq import quantize_awq, quantize_awq_gptq, search_scales
from lutlm.quantize.calibration import CalibrationSet, InputStats, record_inputs
from lutlm.quantize.config import CALIBRATED_METHODS, SCALING_METHODS, QuantConfig
from lutlm.quantize.gptq import quantize_gptq
from lutlm.quantize.rtn import quantize_rtn
from lutlm.quantize.ternary import quantize_ternary
from lutlm.quantize.tune import tune_grids

CALIBRATION_BATCH = 8  # sequences per forward pass: bounds activation memory


@dataclass(frozen=True)
class InputGroup:
    """Linears that read one input, and the operation that produces it (where AWQ folds
    the inverse of its input scales)."""

    producer: str
    linears: tuple[str, ...]


def layer_input_groups(layer: int) -> list[InputGroup]:
    p = f"model.layers.{layer}"
    return [
        InputGroup(f"{p}.input_layernorm", (f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj")),
        InputGroup(f"{p}.self_attn.v_proj", (f"{p}.self_attn.o_proj",)),
        InputGroup(f"{p}.post_attention_layernorm", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")),
        InputGroup(f"{p}.mlp.up_proj", (f"{p}.mlp.down_proj",)),
    ]


HEAD_GROUP = InputGroup("model.norm", ("lm_head",))


def input_groups(checkpoint: Checkpoint, config: QuantConfig) -> list[list[InputGroup]]:
    """The groups of each decoder layer, then (if quantized) the head's."""
    stages = [layer_input_groups(i) for i in range(checkpoint.config.num_hidden_layers)]
    return stages + [[HEAD_GROUP]] if config.quantize_head else stages


def float_weight(checkpoint: Checkpoint, linear: str) -> torch.Tensor:
    name = f"{linear}.weight"
    if name not in checkpoint.tensors and linear == "lm_head" and checkpoint.config.tie_word_embeddings:
        name = "model.embed_tokens.weight"
    if name not in checkpoint.tensors:
        raise ValueError(f"{checkpoint.source}: no float weight {name} to quantize")
    return checkpoint.tensors[name]


def plan_group_sizes(checkpoint: Checkpoint, config: QuantConfig) -> dict[str, int]:
    """Each linear's group size, checked before any work so that a bad request fails at once."""
    if checkpoint.packed:
        raise ValueError(f"{checkpoint.source} is already quantized; quantize a float source model instead")
    plan = {}
    layer_shapes = expected_shapes(checkpoint.config)  # not the tensors: reading them may dequantize a file
    for stage in input_groups(checkpoint, config):
        for group in stage:
            for linear in group.linears:
                k = checkpoint.config.hidden_size if linear == "lm_head" else layer_shapes[f"{linear}.weight"][1]
                plan[linear] = config.group_size_for(linear, k)
                check_config(config.bits, plan[linear], k, config.ternary)
    return plan


@dataclass
class QuantizationResult:
    packed: dict[str, PackedWeight]
    float_tensors: dict[str, torch.Tensor]  # float tensors changed by quantization (AWQ-folded norms)
    group_sizes: dict[str, int]
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per quantized weight, fp16 scales and zeros included."""
        weights = sum(w.out_features * w.in_features for w in self.packed.values())
        bits = sum(w.bits_per_weight * w.out_features * w.in_features for w in self.packed.values())
        return bits / weights


def quantize_weights_only(checkpoint: Checkpoint, config: QuantConfig, plan: dict[str, int],
                          progress: bool) -> dict[str, PackedWeight]:
    packed = {}
    for linear in tqdm(plan, desc=f"quantizing ({config.describe()})", unit="linear", disable=not progress):
        w = float_weight(checkpoint, linear)
        if config.ternary:
            packed[linear] = quantize_ternary(w, None if config.ternary_group is None else plan[linear])
        else:
            packed[linear] = quantize_rtn(w, config.bits, plan[linear], config.symmetric)
    return packed


class StopForward(Exception):
    """Raised by a hook once the first decoder layer's inputs are captured."""


def first_layer_inputs(model: nn.Module, tokens: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
    """Run the embedding on each batch of calibration sequences; return the hidden states
    and the other arguments (rotary tables, start position) the decoder layers are called with."""
    captured = []

    def capture(_module, args):
        captured.append(args)
        raise StopForward

    hook = model.model.layers[0].register_forward_pre_hook(capture)
    try:
        for batch in tokens.split(CALIBRATION_BATCH):
            with contextlib.suppress(StopForward):
                model(batch, 0)
    finally:
        hook.remove()
    return [args[0] for args in captured], captured[0][1:]


def can_fold(model: nn.Module, group: InputGroup) -> bool:
    """AWQ scales fold into an RMSNorm's weight, or into the rows of a producing linear
    whose outputs are exactly the group's inputs (not v_proj -> o_proj under grouped-query
    attention, where one v row feeds several o columns)."""
    producer = model.get_submodule(group.producer)
    if isinstance(producer, nn.Linear):
        return producer.out_features == model.get_submodule(group.linears[0]).in_features
    return True


def fold_inverse_scales(model: nn.Module, group: InputGroup, scales: torch.Tensor) -> None:
    """Divide the producer's output channels by `scales` (new tensors: the source checkpoint
    shares its storage with the model and must stay unchanged)."""
    producer = model.get_submodule(group.producer)
    if isinstance(producer, nn.Linear):
        producer.weight = nn.Parameter(producer.weight / scales.view(-1, 1), requires_grad=False)
    else:
        producer.weight = nn.Parameter(producer.weight / scales, requires_grad=False)


def quantize_stage(model: nn.Module, stage: list[InputGroup], stats: dict[str, InputStats],
                   config: QuantConfig, plan: dict[str, int]) -> tuple[dict[str, PackedWeight], dict]:
    """Quantize the linears of one decoder layer (or the head) from their recorded inputs;
    returns the packed weights and the AWQ scales folded, by input group."""
    scales = {}
    for group in stage:
        if config.method in SCALING_METHODS and can_fold(model, group):
            s = stats[group.producer]
            weights = [model.get_submodule(name).weight.detach() for name in group.linears]
            scales[group] = search_scales(weights, s.hessian, s.mean_abs, config.bits,
                                          [plan[name] for name in group.linears], config.symmetric)
    # All scales are searched on the layer as it was, then folded, as AWQ does.
    for group, s in scales.items():
        fold_inverse_scales(model, group, s)
    packed = {}
    for group in stage:
        hessian = stats[group.producer].hessian
        for name in group.linears:
            w = model.get_submodule(name).weight.detach()
            s = scales.get(group, torch.ones(w.shape[1], device=w.device))
            if config.method == "awq":
                packed[name] = quantize_awq(w, hessian, s, config.bits, plan[name], config.symmetric)
            elif config.method == "awq-gptq":
                packed[name] = quantize_awq_gptq(w, hessian, s, config.bits, plan[name], config.symmetric,
                                                 config.damp, config.act_order)
            else:
                packed[name] = quantize_gptq(w, hessian, config.bits, plan[name], config.symmetric,
                                             config.damp, config.act_order)
            # Later layers see this layer's quantized outputs.
            model.get_submodule(name).weight = nn.Parameter(packed[name].dequantize().to(w.device), requires_grad=False)
    return packed, scales


def record_stage(model: nn.Module, stage: list[InputGroup], hidden: list[torch.Tensor],
                 layer_args: tuple, index: int) -> dict[str, InputStats]:
    """Input statistics of each group of the stage (keyed by producer) over all batches."""
    if stage == [HEAD_GROUP]:
        stats = InputStats(model.lm_head.in_features, model.lm_head.weight.device)
        for x in hidden:
            stats.add(model.model.norm(x))
        return {HEAD_GROUP.producer: stats}
    taps = {group.producer: model.get_submodule(group.linears[0]) for group in stage}
    with record_inputs(taps) as stats:
        for x in hidden:
            model.model.layers[index](x, *layer_args)
    return stats


@torch.no_grad()  # not inference_mode: the tensors made here become model parameters later
def quantize_calibrated(checkpoint: Checkpoint, config: QuantConfig, plan: dict[str, int],
                        calibration: CalibrationSet, device: str, progress: bool) -> tuple[dict, dict]:
    """Packed linears, and the float tensors AWQ changed (norm weights with folded scales).
    One decoder layer's float weights are in memory at a time."""
    from lutlm.loader import build_model, load_layer

    model = build_model(checkpoint, load_layers=False)
    # Not the layers (on "meta"), and the head only if it is quantized: the first layer's
    # inputs need the embedding alone.
    used = (model.model.embed_tokens, model.model.norm) + ((model.lm_head,) if config.quantize_head else ())
    for loaded in used:
        loaded.to(device)
    model.inv_freq = model.inv_freq.to(device)
    n_sequences, seq_len = calibration.tokens.shape
    model.setup_cache(min(CALIBRATION_BATCH, n_sequences), seq_len)
    hidden, layer_args = first_layer_inputs(model, calibration.tokens.to(device))
    if not config.quantize_head:  # neither is used again: 1.5 GB of float32 at a 49152 x 4096 vocabulary
        model.model.embed_tokens.to("meta")
        model.lm_head.to("meta")
    packed, float_tensors = {}, {}
    stages = input_groups(checkpoint, config)
    bar = tqdm(stages, desc=f"quantizing ({config.describe()})", unit="layer", disable=not progress)
    for index, stage in enumerate(bar):
        if stage != [HEAD_GROUP]:
            load_layer(model, checkpoint, index, device)
        # The statistics are not bound here: the last layer's (float64 K x K sums, ~1.3 GB a
        # 7B layer) would stay alive while the next layer's are recorded.
        stage_packed, scales = quantize_stage(model, stage, record_stage(model, stage, hidden, layer_args, index),
                                              config, plan)
        packed.update(stage_packed)
        for group in scales:
            if group.producer not in stage_packed:  # a norm; folds into linears travel in their packed weights
                float_tensors[f"{group.producer}.weight"] = model.get_submodule(group.producer).weight.detach().cpu()
        if stage != [HEAD_GROUP]:
            hidden = [model.model.layers[index](x, *layer_args) for x in hidden]
            model.model.layers[index].to("meta")  # its packed weights are kept; its float ones go
    return packed, float_tensors


def quantize_checkpoint(checkpoint: Checkpoint, config: QuantConfig, calibration: CalibrationSet | None = None,
                        progress: bool = True, device: str = "cpu") -> tuple[Checkpoint, QuantizationResult]:
    """A checkpoint whose linears are packed low-bit weights, and how it was made. `device`:
    where the calibrated quantizers and the tuning run (the results are the same, up to float
    rounding, on any device); the packed weights come back in CPU memory."""
    plan = plan_group_sizes(checkpoint, config)
    start = time.perf_counter()
    if config.needs_calibration and calibration is None:
        raise ValueError(f"{config.describe()} needs calibration data")
    if config.method in CALIBRATED_METHODS:
        packed, float_tensors = quantize_calibrated(checkpoint, config, plan, calibration, device, progress)
    else:
        packed, float_tensors = quantize_weights_only(checkpoint, config, plan, progress), {}
    if config.tune_steps:
        packed, float_tensors = tune_grids(checkpoint, packed, float_tensors, calibration, config.tune_steps,
                                           config.tune_sequences, config.tune_codes, config.tune_code_lr,
                                           config.tune_generated, device, progress)
    result = QuantizationResult(packed, float_tensors, plan, time.perf_counter() - start)
    return packed_checkpoint(checkpoint, config, result, calibration), result


def packed_checkpoint(checkpoint: Checkpoint, config: QuantConfig, result: QuantizationResult,
                      calibration: CalibrationSet | None) -> Checkpoint:
    """The source checkpoint with `result`'s packed linears and changed float tensors, and the
    quantization's description (saved as the packed folder's metadata)."""
    packed, float_tensors, plan = result.packed, result.float_tensors, result.group_sizes
    tensors = unpacked_tensors(checkpoint.tensors, packed)
    tensors.update(float_tensors)
    types = {name: kind for name, kind in checkpoint.tensor_types.items() if name in tensors}
    types.update({f"{name}.weight": packed_type_name(w) for name, w in packed.items()})
    info = {
        **config.to_dict(),
        "source": checkpoint.source,
        "group_sizes": plan,
        "bits_per_weight": result.bits_per_weight,
        "seconds": result.seconds,
        "calibration": calibration.describe() if calibration and config.needs_calibration else None,
    }
    return dataclasses.replace(checkpoint, tensors=tensors, tensor_types=types, packed=packed, quantization=info)

