"""Peak memory and step time of a LoRA / QLoRA run, from the model's config and the run's settings.

Nothing here touches a GPU or loads a weight. The model is built on the meta device (shapes only)
so every family's linear layers, embeddings and norms are counted as they are, not from a formula
per architecture. What is counted, on the training device:

    weights       NF4: n/2 bytes of codes + the block scales (one per 64 values: a uint8 with
                  double quantisation plus one fp32 per 256 of those, else one fp32) + the code
                  tables; int8: n bytes + one fp32 scale per row; 16-bit / fp32: n x 2 / 4.
                  Embeddings, norms and lm_head stay in the compute dtype (bitsandbytes skips them).
    lora          r x (in + out) per adapted projection, in the adapter dtype (bf16 on Ampere+
                  GPUs: TRL casts QLoRA adapters; fp32 on the CPU), with an equal gradient.
    optimizer     8-bit AdamW: 2 bytes per element (+ an fp32 scale per 256) for tensors of at least
                  4,096 elements, 8 bytes for smaller ones (bitsandbytes' min_8bit_size); the flat
                  variant gathers the gradients into one buffer during the step (a phase of its
                  own: the activations are gone by then). torch AdamW: 8 bytes per element.
    activations   with checkpointing: one [tokens, hidden] input per decoder layer (offloaded
                  "unsloth" mode: in pinned host memory, two on the device for the prefetch),
                  plus one layer's recomputed activations and its backward's gradient buffers.
                  Without: every layer's saved tensors.
    loss          the chunked loss's logits chunk (256 MiB on CUDA) or, unchunked, the full
                  [tokens, vocab] logits in the compute dtype plus their fp32 copy and gradient.
    overhead      what torch.cuda.max_memory_allocated does not see: the CUDA context and the
                  caching allocator's slack, reported apart (`device_total`).

The per-layer activation bytes come from counting the tensors autograd saves (see
tests/planning/test_estimate.py, which checks them against torch's saved-tensor hooks on tiny
models); bench/plan_check.py compares the whole estimate with measured GPU peaks.

Time: FLOPs per step, 2 x params x tokens per matmul pass (forward, input gradient, and the
recomputation under checkpointing) plus attention, divided by the device's dense throughput
times a model-utilisation factor measured on the bench (bench/README.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

GiB = 2**30
MiB = 2**20

NF4_BLOCK = 64  # values per absmax (bitsandbytes' default 4-bit blocksize)
NESTED_BLOCK = 256  # absmax values per second-level scale (double quantisation)
OPTIM_BLOCK = 256  # bitsandbytes' 8-bit optimizer state block
MIN_8BIT_SIZE = 4096  # smaller tensors get 32-bit optimizer state
CE_CHUNK_BYTES_CUDA = 256 * MiB  # kernels/cross_entropy.py: one chunk's logits
CE_CHUNK_BYTES_CPU = 16 * MiB
CUDA_CONTEXT_BYTES = 600 * MiB  # CUDA context + cuBLAS workspace: outside max_memory_allocated
ALLOCATOR_SLACK = 0.05  # reserved over allocated, as bench/README's tables show (2-8%)
OFFLOAD_ON_DEVICE = 2  # layer inputs on the device in offloaded mode: the current one and the prefetch


@dataclass(frozen=True)
class Linear:
    name: str  # qualified module name, e.g. "model.layers.0.self_attn.q_proj"
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelFacts:
    """A model's shapes, read from its config on the meta device (no weights)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated_mlp: bool
    linears: tuple[Linear, ...]  # the decoder layers' linear layers (what NF4 / int8 quantise)
    embedding_numel: int
    head_numel: int  # lm_head, 0 when tied to the embedding
    other_numel: int  # norms, biases and anything else
    buffer_bytes: int = 0  # RoPE frequency tables and other buffers, as stored

    @property
    def linear_numel(self) -> int:
        return sum(linear.numel for linear in self.linears)

    @property
    def total_params(self) -> int:
        return self.linear_numel + self.embedding_numel + self.head_numel + self.other_numel

    @classmethod
    def from_config(cls, config) -> "ModelFacts":
        """config: a transformers PretrainedConfig (or a config.json dict)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from tuneforge.models.families import head_dim

        if isinstance(config, dict):
            values = dict(config)
            config = AutoConfig.for_model(values.pop("model_type"), **values)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        linears, embedding, head, other = [], 0, 0, 0
        head_module = model.get_output_embeddings()
        embed_module = model.get_input_embeddings()
        seen = set()
        for name, module in model.named_modules():
            if module is embed_module:
                embedding += module.weight.numel()
                seen.add(id(module.weight))
            elif module is head_module:
                if id(module.weight) not in seen:
                    head += module.weight.numel()
                seen.add(id(module.weight))
            elif isinstance(module, torch.nn.Linear):
                linears.append(Linear(name, module.out_features, module.in_features))
                seen.add(id(module.weight))
        for parameter in model.parameters():
            if id(parameter) not in seen:
                other += parameter.numel()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        names = {linear.short for linear in linears}
        return cls(
            model_type=text.model_type, hidden=text.hidden_size,
            intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
            layers=text.num_hidden_layers, heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim(text),
            vocab=text.vocab_size, tied=head == 0, gated_mlp=bool(names & {"gate_proj", "gate_up_proj", "w1"}),
            linears=tuple(linears), embedding_numel=embedding, head_numel=head, other_numel=other,
            buffer_bytes=sum(buffer.numel() * buffer.element_size() for buffer in model.buffers()),
        )


@dataclass(frozen=True)
class RunSetup:
    """What the run does, in the terms the estimate needs.

    batch: rows per micro-batch; seq: tokens per row at the peak (the longest padded batch, or
    max_seq_length when packing); mean_seq: tokens per row on average (for time).
    quant: "nf4" | "int8" | "16bit" | "full" (full fine-tuning in the compute dtype).
    compute_bytes: 2 (bf16 / fp16) or 4 (fp32, the CPU); checkpointing: "offload" | "standard" | None.
    kernels: tuneforge's patched forwards (fused LoRA, chunked loss) run; device: "cuda" | "cpu".
    """

    batch: int
    seq: int
    mean_seq: float
    quant: str = "nf4"
    double_quant: bool = True
    compute_bytes: int = 2
    lora_r: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    modules_to_save: tuple[str, ...] = ()
    checkpointing: str | None = "offload"
    optim: str = "adamw_8bit"
    kernels: bool = True
    device: str = "cuda"
    grad_accum: int = 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes holds for one NF4 weight of `numel` values (codes, scales, code tables)."""
    blocks = -(-numel // NF4_BLOCK)
    codes = -(-numel // 2)
    tables = 16 * 4 + 4  # the NF4 code (16 fp32) and the offset
    if double_quant:
        nested = -(-blocks // NESTED_BLOCK)
        return codes + blocks + nested * 4 + 256 * 4 + tables  # uint8 absmax, fp32 nested absmax, its code
    return codes + blocks * 4 + 16 * 4


def weight_bytes(facts: ModelFacts, setup: RunSetup) -> int:
    """Device bytes of the frozen (or fully trained) base weights."""
    unquantised = (facts.embedding_numel + facts.head_numel + facts.other_numel) * setup.compute_bytes \
        + facts.buffer_bytes
    if setup.quant == "nf4":
        return unquantised + sum(nf4_bytes(linear.numel, setup.double_quant) for linear in facts.linears)
    if setup.quant == "int8":
        return unquantised + sum(linear.numel + 4 * linear.out_features for linear in facts.linears)
    return unquantised + facts.linear_numel * setup.compute_bytes


def _adapted(facts: ModelFacts, setup: RunSetup) -> list[Linear]:
    targets = set(setup.target_modules)
    if "all-linear" in targets:
        return list(facts.linears)
    return [linear for linear in facts.linears if linear.short in targets]


def trainable_tensors(facts: ModelFacts, setup: RunSetup) -> list[int]:
    """Element counts of every trainable tensor (LoRA A and B, modules_to_save copies, or all of a
    full fine-tune): what the gradients and the optimizer state are sized by."""
    if setup.quant == "full":
        sizes = [linear.numel for linear in facts.linears] + [facts.embedding_numel]
        return sizes + ([facts.head_numel] if facts.head_numel else []) + [facts.other_numel]
    sizes = []
    for linear in _adapted(facts, setup):
        sizes += [setup.lora_r * linear.in_features, setup.lora_r * linear.out_features]
    for name in setup.modules_to_save:
        if name == "embed_tokens":
            sizes.append(facts.embedding_numel)
        elif name == "lm_head":
            sizes.append(facts.head_numel or facts.embedding_numel)
    return sizes


def adapter_bytes_per_element(setup: RunSetup) -> int:
    """Trainable parameters' element size: QLoRA adapters follow the compute dtype on GPUs (TRL
    casts them to bf16), fp32 on the CPU (tuneforge casts them back there)."""
    if setup.device == "cpu":
        return 4
    return setup.compute_bytes


def optimizer_bytes(sizes: list[int], setup: RunSetup) -> int:
    """Optimizer state bytes for trainable tensors of `sizes` elements."""
    if "8bit" not in setup.optim:
        return 8 * sum(sizes)  # torch AdamW: two fp32 moments
    total = 2 * 256 * 4  # the two quantisation maps (shared)
    for n in sizes:
        if n < MIN_8BIT_SIZE:
            total += 8 * n  # two fp32 moments
        else:
            padded = -(-n // OPTIM_BLOCK) * OPTIM_BLOCK
            total += 2 * padded + 2 * 4 * (padded // OPTIM_BLOCK)  # two uint8 moments + their fp32 absmax
    return total


def optimizer_step_bytes(sizes: list[int], setup: RunSetup, element_bytes: int) -> int:
    """What the step allocates for itself: FlatAdamW8bit gathers the gradients of its 8-bit
    tensors into one flat buffer (padded to the block) for one bitsandbytes update."""
    if setup.optim not in ("adamw_8bit", "adamw_bnb_8bit"):
        return 0
    return sum(-(-n // OPTIM_BLOCK) * OPTIM_BLOCK for n in sizes if n >= MIN_8BIT_SIZE) * element_bytes


def layer_activation_bytes(facts: ModelFacts, setup: RunSetup, tokens: int) -> int:
    """Bytes autograd saves inside one decoder layer for `tokens` tokens (LoRA on the setup's targets).

    Per token, in units of the compute dtype e, with h = hidden, q = heads x head_dim,
    kv = kv_heads x head_dim, i = intermediate, r = LoRA rank x adapters in the layer:
      3h            the two norms' inputs and the attention block's normed input
      2q + 2kv      q, k, v and the attention output (the o projection's input)
      2i            kernels: the gated MLP's gate and up (the product is recomputed in the backward);
      4i            transformers: gate, up, the activation and the product
      r             x @ A^T of every adapter
    and in fp32 the attention's log-sum-exp per head and the norms' 1/rms. Counted on tiny models
    against torch's saved-tensor hooks (tests/planning/test_estimate.py). transformers' RMSNorm
    also keeps fp32 copies of its input in 16-bit runs (2 x h x (4 - e)).
    """
    e = setup.compute_bytes
    h, i = facts.hidden, facts.intermediate
    q = facts.heads * facts.head_dim
    kv = facts.kv_heads * facts.head_dim
    ranks = setup.lora_r * len(_adapted_in_layer(facts, setup)) if setup.quant != "full" else 0
    if setup.kernels:
        per_token = e * (3 * h + 2 * q + 2 * kv + 2 * i + ranks) + 4 * (facts.heads + 1)
    else:
        per_token = e * (3 * h + 2 * q + 2 * kv + 4 * i + ranks) + 4 * (facts.heads + 2) + 2 * h * (4 - e)
    return tokens * per_token


def _adapted_in_layer(facts: ModelFacts, setup: RunSetup) -> list[Linear]:
    """The adapted projections of the first decoder layer (the first numbered module in a name)."""
    import re

    def layer(name: str) -> int | None:
        found = re.search(r"\.(\d+)\.", name)
        return int(found.group(1)) if found else None

    return [linear for linear in _adapted(facts, setup) if layer(linear.name) == 0]


def backward_buffer_bytes(facts: ModelFacts, setup: RunSetup, tokens: int) -> int:
    """A layer's backward, next to its recomputed activations: the output and input gradients
    [tokens, hidden], the MLP's intermediate gradients, and the 16-bit copy of the largest
    dequantised weight (gate | up as one group with kernels)."""
    e = setup.compute_bytes
    mlp = 2 if facts.gated_mlp else 1
    gradients = tokens * e * (2 * facts.hidden + mlp * facts.intermediate)
    largest = max((linear.numel for linear in facts.linears), default=0)
    grouped = mlp if (setup.kernels and setup.quant == "nf4") else 1
    workspace = grouped * largest * e if setup.quant in ("nf4", "int8") else 0
    return gradients + workspace


@dataclass
class DeviceSpec:
    name: str
    memory_bytes: int  # total device memory (0: unknown / host)
    peak_flops: float  # dense throughput of the compute dtype, FLOP/s
    utilisation: float  # the fraction of it a LoRA step reaches (model FLOPs utilisation)
    source: str  # where the throughput figure comes from


# Dense bf16 (fp16 for pre-Ampere) tensor-core throughput, from the vendors' data sheets.
GPU_TABLE = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "A10": 125e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12,
    "V100": 125e12, "B200": 2250e12,
}


def utilisation_for(params: float, device: str) -> float:
    """The fraction of the device's dense throughput a tuneforge step reaches, in `step_flops`'s
    count. GPUs: interpolated on log(parameters) between bench/README.md's H100 runs (Llama-3.2-1B
    4 x 2048: 0.211 s/step = 0.30; Llama-3.1-8B 2 x 2048: 0.430 s/step = 0.45); small models are
    launch-bound and get less. CPU: the default SmolLM2-135M QLoRA run (batch 2, ~54 padded
    tokens per row, one thread, 2-core AVX512 Xeon) measured 3.4 s/step for 0.086 TFLOP against the
    matmul probe's 95 GFLOP/s: 0.26 (NF4 dequantisation and Python dominate small CPU steps)."""
    if device == "cpu":
        return CPU_UTILISATION
    lo, hi = math.log(1.24e9), math.log(8.03e9)
    t = (math.log(max(params, 1e6)) - lo) / (hi - lo)
    return max(0.05, min(0.45, 0.30 + t * (0.45 - 0.30)))


CPU_UTILISATION = 0.26


def step_flops(facts: ModelFacts, setup: RunSetup, tokens: float, seq: float) -> float:
    """FLOPs of one optimizer micro-step over `tokens` tokens in rows of `seq`.

    Matmul passes over the base weights: forward, input gradient, and a second forward under
    checkpointing (frozen weights get no weight gradient); full fine-tuning adds the weight gradient.
    Attention: 4 x seq x q per token per layer forward (causal halves the square), x3 for training.
    """
    passes = 2 + (1 if setup.checkpointing else 0) + (1 if setup.quant == "full" else 0)
    linear = 2 * facts.linear_numel * tokens * passes
    head = 2 * (facts.head_numel or facts.embedding_numel) * tokens * 2  # logits, and their input gradient
    lora = sum(2 * n for n in trainable_tensors(facts, setup)) * tokens * (passes + 1) if setup.quant != "full" else 0
    attention = 4 * seq / 2 * facts.heads * facts.head_dim * tokens * facts.layers * (3 + bool(setup.checkpointing))
    return linear + head + lora + attention


@dataclass
class Estimate:
    """The plan's numbers. Memory in bytes on the training device unless `host_` says otherwise."""

    device: str
    device_memory: int
    batch: int
    seq: int
    mean_seq: float
    parts: dict[str, int] = field(default_factory=dict)  # resident through the step
    phases: dict[str, int] = field(default_factory=dict)  # live one at a time: the largest counts
    host_offloaded: int = 0
    overhead: int = 0
    trainable_params: int = 0
    total_params: int = 0
    flops_per_step: float = 0.0
    seconds_per_step: float = 0.0
    steps: int = 0
    throughput_source: str = ""
    overhead_label: str = "+ context, allocator"

    @property
    def peak(self) -> int:
        """What torch.cuda.max_memory_allocated should read (the CPU: the tensors alone)."""
        return sum(self.parts.values()) + max(self.phases.values(), default=0)

    @property
    def device_total(self) -> int:
        """Peak plus CUDA context and allocator slack: what must fit on the card."""
        return self.peak + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if not self.device_memory else self.device_total <= self.device_memory

    @property
    def run_seconds(self) -> float:
        return self.seconds_per_step * self.steps

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(peak=self.peak, device_total=self.device_total, fits=self.fits, run_seconds=self.run_seconds)
        return out

    def lines(self) -> list[str]:
        """The human table: one line per part, then the totals and the time."""
        rows = [f"memory estimate on {self.device} (batch {self.batch} x seq {self.seq}):"]
        for name, value in self.parts.items():
            rows.append(f"  {name:<22}{_gib(value):>10}")
        largest = max(self.phases, key=self.phases.get) if self.phases else None
        for name, value in self.phases.items():
            rows.append(f"  {name:<22}{_gib(value):>10}" + ("  (the peak phase)" if name == largest else ""))
        peak = "peak (tensors)" if self.overhead_label.startswith("+ process") else "peak (allocated)"
        rows.append(f"  {peak:<22}{_gib(self.peak):>10}")
        if self.overhead:
            rows.append(f"  {self.overhead_label:<22}{_gib(self.overhead):>10}")
            card = f" of {_gib(self.device_memory)}" if self.device_memory else ""
            verdict = {True: "fits", False: "DOES NOT FIT", None: ""}[self.fits]
            rows.append(f"  {'device total':<22}{_gib(self.device_total):>10}{card} {verdict}".rstrip())
        if self.host_offloaded:
            rows.append(f"  {'host (offloaded)':<22}{_gib(self.host_offloaded):>10}  pinned CPU memory for layer inputs")
        rows.append(f"time: {self.flops_per_step / 1e12:.2f} TFLOP per step, ~{_seconds(self.seconds_per_step)} "
                    f"per step at {self.mean_seq:.0f} tokens/row on average"
                    + (f", ~{_seconds(self.run_seconds)} for {self.steps} steps" if self.steps else "")
                    + f" ({self.throughput_source})")
        return rows


def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= 0.1 * GiB else f"{value / MiB:.1f} MiB"


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def estimate(facts: ModelFacts, setup: RunSetup, device: DeviceSpec, steps: int = 0) -> Estimate:
    """Peak memory and time of `setup` on `device` (see the module docstring for what is counted)."""
    tokens = setup.tokens
    e = setup.compute_bytes
    h = facts.hidden
    sizes = trainable_tensors(facts, setup)
    element = e if setup.quant == "full" else adapter_bytes_per_element(setup)
    trainable = sum(sizes)
    parts = {"weights": weight_bytes(facts, setup)}
    if setup.quant == "full":
        parts["gradients"] = trainable * element
    else:
        parts["lora + gradients"] = 2 * trainable * element
    parts["optimizer state"] = optimizer_bytes(sizes, setup)
    layer_input = tokens * h * e
    host = 0
    layer = layer_activation_bytes(facts, setup, tokens)
    backward = backward_buffer_bytes(facts, setup, tokens)
    if setup.checkpointing == "offload" and setup.device == "cuda":
        host = facts.layers * layer_input
        parts["layer inputs (device)"] = min(facts.layers, OFFLOAD_ON_DEVICE) * layer_input
        phases = {"layer backward": layer + backward}
    elif setup.checkpointing:
        parts["layer inputs"] = facts.layers * layer_input
        phases = {"layer backward": layer + backward}
    else:
        parts["activations"] = facts.layers * layer
        phases = {"layer backward": backward}
    vocab = facts.vocab
    if setup.kernels:
        budget = CE_CHUNK_BYTES_CUDA if setup.device == "cuda" else CE_CHUNK_BYTES_CPU
        rows = min(tokens, max(1, budget // (vocab * e)))
        phases["loss (logits chunk)"] = rows * vocab * e + tokens * h * 4  # chunk + fp32 hidden gradient
    else:
        # transformers: logits in the compute dtype, upcast to fp32 for the loss, its gradient.
        phases["loss (full logits)"] = tokens * vocab * (e + 4 + 4)
    phases["optimizer step"] = optimizer_step_bytes(sizes, setup, element)
    overhead = 0
    if setup.device == "cuda":
        overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * (sum(parts.values()) + max(phases.values())))
    mean_tokens = setup.batch * setup.mean_seq
    flops = step_flops(facts, setup, mean_tokens, setup.mean_seq) * setup.grad_accum
    rate = device.peak_flops * device.utilisation
    return Estimate(
        device=device.name, device_memory=device.memory_bytes, batch=setup.batch, seq=setup.seq,
        mean_seq=setup.mean_seq, parts=parts, phases=phases, host_offloaded=host, overhead=overhead, trainable_params=trainable,
        total_params=facts.total_params, flops_per_step=flops, seconds_per_step=flops / rate if rate else 0.0,
        steps=steps, throughput_source=device.source,
    )
