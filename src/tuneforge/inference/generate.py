"""Fast `generate`: static KV cache, eager prefill, decode steps replayed from one CUDA graph.

transformers' decode loop runs Python for every token (input preparation, mask building, cache
bookkeeping, logits processors, stopping criteria) and launches hundreds of small kernels, each
from the host: at batch 1-8 the GPU mostly waits. Here a token costs one `CUDAGraph.replay()`:

  prefill    the prompt in one eager forward of the model's own (patched, maybe peft-wrapped)
             modules, keys/values written into a `StaticKVCache` [B, kv_heads, max_len, head_dim]
  decode     one new token per row: write its K/V at `slot`, attend over the valid slots, choose
             the next token on the device (`sampling`), mark rows that emitted EOS. Every input
             lives in a persistent buffer (ids, positions, slot, step, valid-slot mask), so the
             step is captured once per (batch, max_len, sampling, model state) and replayed.
  stop       "has every row finished?" is read on the host every CHECK_EVERY steps (the only
             sync); extra steps after the end only write padding, which is trimmed.

The output equals transformers' `generate` (greedy: token for token; tests compare): same
positions (cumsum of the attention mask), same masks (boolean for SDPA, additive for eager),
same float32 logits processing, padding after EOS, min_new_tokens, left-padded batches.

Anything else `generate` can do (beams, repetition penalty, output_scores, stop strings, ...)
goes to transformers' own `generate`, with one log line naming the reason.
On the CPU there are no graphs: the same step runs eagerly (what the CPU tests exercise).
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from dataclasses import dataclass

import torch

from tuneforge.inference.cache import StaticKVCache, decode_mask, prefill_mask
from tuneforge.inference.sampling import Sampling, block_tokens, choose
from tuneforge.integration.peft import base_model
from tuneforge.models.record import record_of

logger = logging.getLogger(__name__)

CHECK_EVERY = 8      # decode steps between host reads of "every row finished?" on CUDA
SLOT_ROUNDING = 128  # max_len is rounded up to this, so chat turns of growing length reuse one graph
WARMUP_STEPS = 2     # eager steps before capture: Triton compilation / autotuning, cuBLAS workspaces


class Unsupported(Exception):
    """The fast path cannot run this call; transformers' generate runs it instead."""


@dataclass
class Call:
    """One `generate` call, resolved (transformers' precedence: arguments > generation config of
    the call > the model's generation config > transformers' defaults).

    input_ids, attention_mask: [B, P] on the model's device (mask: 1 at real tokens).
    max_new:  tokens to generate at most; min_new: EOS is blocked while fewer were generated.
    eos:      the stop token ids (empty: run to max_new); pad: written after a row's EOS.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new: int
    min_new: int
    sampling: Sampling
    eos: tuple[int, ...]
    pad: int
    streamer: object = None


# --- which calls and models the fast path takes ----------------------------------------------------

# generate() arguments that must be left at their defaults (None / empty).
_UNTAKEN_ARGUMENTS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                      "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask",
                      "custom_generate", "use_model_defaults")
# Generation-config fields the fast path implements.
_HANDLED = {"max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k",
            "top_p", "min_p", "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache",
            "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
            "transformers_version", "low_memory", "is_assistant"}
# Fields that only matter for beam search or assisted decoding, which a set num_beams / assistant
# would already have sent to transformers.
_IRRELEVANT = {"early_stopping", "length_penalty", "num_assistant_tokens", "num_assistant_tokens_schedule",
               "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
               "max_matching_ngram_size", "assistant_early_exit"}
# Values of other fields that change nothing.
_NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
            "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0, "num_beam_groups": 1, "diversity_penalty": 0.0, "guidance_scale": 1.0,
            "penalty_alpha": 0.0}


def _config_reason(config) -> str | None:
    """Why the fast path cannot honour generation config `config` (None: it can)."""
    for name, value in vars(config).items():
        if name.startswith("_") or name in _HANDLED or name in _IRRELEVANT:
            continue
        if value is None or value is False or (isinstance(value, (dict, list, tuple)) and not value):
            continue
        if name in _NEUTRAL and value == _NEUTRAL[name]:
            continue
        return f"generation option {name}={value!r}"
    if config.use_cache is False:
        return "use_cache=False"
    if config.cache_implementation not in (None, "static", "dynamic"):
        return f"cache_implementation={config.cache_implementation!r}"
    if config.is_assistant:
        return "assisted decoding"
    return None


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.flatten().tolist())
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def resolve_call(model, args: tuple, kwargs: dict) -> Call | str:
    """The call as a `Call`, or the reason the fast path does not take it."""
    kwargs = dict(kwargs)
    if len(args) > 1:
        return "positional arguments after the inputs"
    inputs = args[0] if args else kwargs.pop("inputs", None)
    for name in _UNTAKEN_ARGUMENTS:
        if kwargs.pop(name, None):
            return f"argument {name}="
    streamer = kwargs.pop("streamer", None)
    kwargs.pop("tokenizer", None)  # only read for stop_strings, which _config_reason refuses
    try:
        config, model_kwargs = model._prepare_generation_config(kwargs.pop("generation_config", None), **kwargs)
    except Exception as error:  # noqa: BLE001 - transformers' generate will raise it properly
        return f"transformers could not resolve the generation config ({error})"
    reason = _config_reason(config)
    if reason:
        return reason
    if inputs is None:
        inputs = model_kwargs.pop("input_ids", None)
    attention_mask = model_kwargs.pop("attention_mask", None)
    extra = sorted(name for name, value in model_kwargs.items() if value is not None)
    if extra:
        return f"argument {extra[0]}= (the fast path takes input_ids and attention_mask)"
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.dtype not in (torch.long, torch.int):
        return "inputs are not a [batch, length] tensor of token ids"
    if inputs.shape[1] == 0:
        return "empty prompt"
    device = model.get_input_embeddings().weight.device
    inputs = inputs.to(device=device, dtype=torch.long)
    prompt = inputs.shape[1]

    eos = _token_ids(config.eos_token_id)
    pad = config.pad_token_id
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)  # transformers: pad defaults to eos[0]
    if attention_mask is None:
        # transformers infers the mask from padding only when pad is present and differs from EOS.
        attention_mask = torch.ones_like(inputs)
        if config.pad_token_id is not None and pad not in eos and bool((inputs == pad).any()):
            attention_mask = inputs.ne(pad).long()
    attention_mask = attention_mask.to(device)
    if attention_mask.shape != inputs.shape:
        return f"attention_mask shape {tuple(attention_mask.shape)} differs from the inputs' {tuple(inputs.shape)}"

    max_new = config.max_new_tokens if config.max_new_tokens is not None else (config.max_length or 20) - prompt
    if max_new < 1:
        return f"nothing to generate (max_length {config.max_length} <= prompt length {prompt})"
    min_new = max(config.min_new_tokens or 0, (config.min_length or 0) - prompt) if eos else 0
    sampling = Sampling()
    if config.do_sample:
        temperature = 1.0 if config.temperature is None else float(config.temperature)
        top_k = int(config.top_k or 0)
        top_p = 1.0 if config.top_p is None else float(config.top_p)
        min_p = 0.0 if config.min_p is None else float(config.min_p)
        if not (temperature > 0 and top_k >= 0 and 0 < top_p <= 1 and 0 <= min_p <= 1):
            return (f"invalid sampling values (temperature={temperature}, top_k={top_k}, top_p={top_p}, "
                    f"min_p={min_p})")
        sampling = Sampling(True, temperature, top_k, top_p, min_p)
    return Call(inputs, attention_mask, int(max_new), int(min_new), sampling, eos, pad, streamer)


def _attention_layers(model) -> list[tuple[str, torch.nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if name.endswith("self_attn") and hasattr(module, "layer_idx")]


def model_reason(model) -> str | None:
    """Why the fast path cannot run `model` at all (None: it can)."""
    from tuneforge.models.families import family_for_model_type

    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    spec = family_for_model_type(config.model_type)
    if spec is None:
        return f"model type {config.model_type!r} is not in tuneforge's family table"
    if spec.attention != "rope":
        return f"family {spec.name} has an attention layout the static cache does not drive"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"attention implementation {implementation!r} (the static cache runs with sdpa or eager)"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    if not _attention_layers(model):
        return "no attention modules with a layer index"
    device_map = getattr(model, "hf_device_map", None) or {}
    if len({str(d) for d in device_map.values()}) > 1:
        return "the model is spread over several devices"
    return None


def _rope_types(config) -> set[str]:
    """Every rope_type named in the config (5.x: rope_parameters, maybe one dict per layer type)."""
    found, stack = set(), [getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if isinstance(value.get("rope_type") or value.get("type"), str):
                found.add(value.get("rope_type") or value.get("type"))
            stack.extend(v for v in value.values() if isinstance(v, dict))
    return found


def graph_reason(model, device: torch.device) -> str | None:
    """Why decode steps cannot be captured in a CUDA graph (None: they can)."""
    if device.type != "cuda":
        return f"no CUDA graphs on {device.type}"
    host_read = _rope_types(model.config) & {"dynamic", "longrope"}
    if host_read:
        # Their rotary embedding compares the largest position with a limit on the host.
        return f"RoPE type {sorted(host_read)[0]} reads the positions on the host"
    return None


def _model_state(model) -> tuple:
    """What changes the Python path of a forward without changing tensor shapes: a captured graph
    is only valid for the state it was captured in (peft's active/disabled/merged adapters, hooks)."""
    hooks, lora = 0, set()
    for module in model.modules():
        hooks += len(module._forward_hooks) + len(module._forward_pre_hooks)
        if hasattr(module, "lora_A"):
            lora.add((tuple(getattr(module, "active_adapters", ()) or ()),
                      bool(getattr(module, "disable_adapters", False)), bool(getattr(module, "merged", False))))
    return model.training, hooks, tuple(sorted(lora))


# --- the decoder -----------------------------------------------------------------------------------


class _Session:
    """The static buffers of one (batch, max_len, sampling, model state): what a graph reads and writes.

    last [B, 1], position [B, 1]: the token fed to the next step and its RoPE position.
    slot [1]:  the cache slot the next step writes (shared by all rows); step [1]: index of the
               token being chosen (0 = the prefill's); block_until [1]: EOS blocked while step < it.
    valid [B, L] bool: slots a row attends to; unfinished [B] bool; done_at [B]: step of each row's EOS.
    tokens [B, L]: the chosen tokens by step; eos [n]; pad [1].
    """

    STATE = ("last", "position", "slot", "step", "valid", "unfinished", "done_at", "tokens")

    def __init__(self, key: tuple, batch: int, max_len: int, n_eos: int, device: torch.device):
        self.key = key
        self.cache = StaticKVCache(batch, max_len)
        long = dict(dtype=torch.long, device=device)
        self.last, self.position = torch.zeros(batch, 1, **long), torch.zeros(batch, 1, **long)
        self.slot, self.step, self.block_until = (torch.zeros(1, **long) for _ in range(3))
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.done_at = torch.zeros(batch, **long)
        self.tokens = torch.zeros(batch, max_len, **long)
        self.eos, self.pad = torch.zeros(n_eos, **long), torch.zeros(1, **long)
        self.graph = None
        self.graph_error: str | None = None  # why capture failed (then the steps run eagerly)

    def snapshot(self) -> dict:
        return {name: getattr(self, name).clone() for name in self.STATE}

    def restore(self, snapshot: dict) -> None:
        for name, value in snapshot.items():
            getattr(self, name).copy_(value)


class Decoder:
    """Generation for one model (the transformers model inside any peft wrapper).

    cuda_graphs: replay decode steps from a captured graph on CUDA (False: run them eagerly, the
    reference the GPU test compares the graph with).
    """

    def __init__(self, model, cuda_graphs: bool = True):
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.session: _Session | None = None
        config = model.config
        self.mask_kind = "bool" if config._attn_implementation == "sdpa" else "additive"
        self.mask_dtype = model.get_input_embeddings().weight.dtype
        if not self.mask_dtype.is_floating_point:
            self.mask_dtype = torch.float32
        layers = _attention_layers(model)
        self.num_layers = len(layers)
        self.windows = self._windows(model, layers)
        self.logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.path = None  # how the last call ran, for logs and benchmarks

    @staticmethod
    def _windows(model, layers) -> dict:
        """{attention type (None: all layers): sliding window or None}, as the layers read it."""
        windows = {}
        modules = dict(model.named_modules())
        layer_types = getattr(model.config, "layer_types", None)
        for name, attn in layers:
            # As the layer itself reads it (patch.attention does the same).
            window = attn.sliding_window if hasattr(attn, "sliding_window") else \
                getattr(attn.config, "sliding_window", None)
            # The key the model's forward looks its mask up by: config.layer_types (5.x), or the
            # decoder layer's attention_type (older releases).
            if layer_types is not None and attn.layer_idx < len(layer_types):
                layer_type = layer_types[attn.layer_idx]
            else:
                layer_type = getattr(modules.get(name.rsplit(".", 1)[0]), "attention_type", None)
            if windows.get(layer_type, window) != window:
                raise Unsupported(f"layers of type {layer_type} have different sliding windows")
            windows[layer_type] = window
        if len(set(windows.values())) > 1 and None in windows:
            raise Unsupported("layers with different sliding windows and no attention_type to tell them apart")
        return windows

    def _masks(self, build, max_len: int):
        """A 4D mask, or {attention type: 4D mask} when layers see different windows at this max_len."""
        effective = {key: (w if w is not None and w < max_len else None) for key, w in self.windows.items()}
        if len(set(effective.values())) == 1:
            return build(next(iter(effective.values())))
        by_window = {}
        for window in effective.values():
            if window not in by_window:
                by_window[window] = build(window)
        return {key: by_window[window] for key, window in effective.items()}

    # -- one forward and the token choice -------------------------------------------------------

    def _forward(self, session: _Session, ids, position_ids, masks) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self.logits_to_keep else {}
        out = self.model(input_ids=ids, attention_mask=masks, position_ids=position_ids,
                         past_key_values=session.cache, use_cache=True, **extra)
        return out.logits[:, -1]

    @staticmethod
    def _select(s: _Session, logits: torch.Tensor, sampling: Sampling) -> None:
        scores = logits.float()
        if s.eos.numel():
            scores = block_tokens(scores, s.eos, s.step < s.block_until)
        chosen = choose(scores, sampling)
        if s.eos.numel():
            chosen = torch.where(s.unfinished, chosen, s.pad)
            stopped = (chosen[:, None] == s.eos[None, :]).any(dim=-1)
            s.done_at.copy_(torch.where(s.unfinished & stopped, s.step, s.done_at))
            s.unfinished.logical_and_(~stopped)
        s.tokens.index_copy_(1, s.step, chosen[:, None])
        s.last.copy_(chosen[:, None])

    def _prefill(self, s: _Session, call: Call) -> None:
        ids, mask = call.input_ids, call.attention_mask.bool()
        prompt = ids.shape[1]
        s.valid.zero_()
        s.valid[:, :prompt] = mask
        s.unfinished.fill_(True)
        s.done_at.fill_(s.tokens.shape[1])
        s.step.zero_()
        s.block_until.fill_(call.min_new)
        s.pad.fill_(call.pad)
        if call.eos:
            s.eos.copy_(torch.tensor(call.eos, dtype=torch.long))
        positions = mask.long().cumsum(-1) - 1
        positions.masked_fill_(~mask, 1)  # as transformers: padding positions are never attended
        s.cache.slots = torch.arange(prompt, device=ids.device)
        s.cache.visible = prompt
        s.cache.updates = 0
        masks = self._masks(lambda w: prefill_mask(mask, w, self.mask_kind, self.mask_dtype), s.cache.max_len)
        logits = self._forward(s, ids, positions, masks)
        if s.cache.updates != self.num_layers:
            raise Unsupported(f"the model's attention wrote {s.cache.updates} of {self.num_layers} layers into "
                              "the static cache")
        self._select(s, logits, call.sampling)
        s.position.copy_(mask.sum(-1, keepdim=True))
        s.slot.fill_(prompt)

    def _decode_step(self, s: _Session, sampling: Sampling) -> None:
        """One token per row from buffers only (this is what a graph captures)."""
        s.valid.index_fill_(1, s.slot, True)
        s.cache.slots = s.slot
        s.cache.visible = s.cache.max_len
        masks = self._masks(lambda w: decode_mask(s.valid, s.slot, w, self.mask_kind, self.mask_dtype),
                            s.cache.max_len)
        logits = self._forward(s, s.last, s.position, masks)
        s.step.add_(1)
        self._select(s, logits, sampling)
        s.position.add_(1)
        s.slot.add_(1)

    def _rehearse(self, s: _Session, sampling: Sampling, steps: int) -> None:
        """Run `steps` decode steps, then put every buffer back: the generation goes on from where
        it was. The cache slots they wrote are rewritten by the real steps before anything reads
        them (a slot becomes valid in the step that writes it)."""
        snapshot = s.snapshot()
        for _ in range(steps):
            self._decode_step(s, sampling)
        s.restore(snapshot)

    def _capture(self, s: _Session, sampling: Sampling) -> None:
        """Warm up on a side stream (as torch.cuda.graphs asks), then capture one decode step.
        Capturing records kernels without running them, so the buffers keep the prefill's state."""
        # The warm-up steps draw random numbers when sampling, and capture reserves some: put the
        # generator back, so a seeded call samples the same tokens whether it captured the graph
        # or found it already there.
        device = s.tokens.device
        rng = torch.cuda.get_rng_state(device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._rehearse(s, sampling, WARMUP_STEPS)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step(s, sampling)
        torch.cuda.set_rng_state(rng, device)
        s.graph = graph

    # -- a whole call -----------------------------------------------------------------------------

    def _session_for(self, call: Call) -> _Session:
        batch, prompt = call.input_ids.shape
        # P + max_new - 1 slots are written; rounded up so calls of similar length share a graph.
        max_len = -(-(prompt + call.max_new) // SLOT_ROUNDING) * SLOT_ROUNDING
        key = (batch, max_len, call.sampling, len(call.eos), _model_state(self.model))
        if self.session is None or self.session.key != key:
            self.session = None  # free the old cache and graph before allocating the new ones
            self.session = _Session(key, batch, max_len, len(call.eos), call.input_ids.device)
        return self.session

    def generate(self, call: Call) -> torch.Tensor:
        """[B, P + n] token ids: the prompt, then n <= max_new generated tokens (padding after EOS)."""
        s = self._session_for(call)
        device = call.input_ids.device
        self._prefill(s, call)
        streamer = call.streamer
        if streamer is not None:
            streamer.put(call.input_ids.cpu())
            streamer.put(s.tokens[:, 0].cpu())
        no_graph = (graph_reason(self.model, device) or (None if self.cuda_graphs else "cuda_graphs=False"))
        if call.max_new > 1 and not no_graph and s.graph is None and s.graph_error is None:
            try:
                self._capture(s, call.sampling)
            except Exception as error:  # noqa: BLE001 - any capture failure leaves the eager step, which works
                s.graph_error = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
                logger.warning("CUDA graph capture failed (%s); decode steps run eagerly", s.graph_error)
        no_graph = no_graph or (s.graph_error and f"capture failed, {s.graph_error}")
        self.path = "static cache + CUDA graph" if s.graph is not None else f"static cache, eager steps ({no_graph})"
        check_every = 1 if (streamer is not None or s.graph is None) else CHECK_EVERY
        produced = 1
        while produced < call.max_new:
            if call.eos and produced % check_every == 0 and not bool(s.unfinished.any()):
                break
            if s.graph is not None:
                s.graph.replay()
            else:
                self._decode_step(s, call.sampling)
            produced += 1
            if streamer is not None:
                streamer.put(s.last[:, 0].cpu())
        length = produced if not call.eos or bool(s.unfinished.any()) else int(s.done_at.max()) + 1
        if streamer is not None:
            streamer.end()
        return torch.cat([call.input_ids, s.tokens[:, :length]], dim=1)


# --- wiring into model.generate ----------------------------------------------------------------------


def _inner(model):
    return base_model(model)


def transformers_generate(model, *args, **kwargs):
    """transformers' own generate for `model` (a peft wrapper's inner model), bypassing the fast path."""
    inner = _inner(model)
    return type(inner).generate(inner, *args, **kwargs)


def _fall_back(model, reason: str, args, kwargs):
    warned = vars(model).setdefault("_tuneforge_generate_warned", set())
    if reason not in warned:  # one line per reason, not one per chat turn
        warned.add(reason)
        logger.warning("fast generate not used, transformers' generate instead: %s", reason)
    record_of(model).generate_path = f"transformers ({reason})"
    return type(model).generate(model, *args, **kwargs)


def unwrap_encoding(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`generate(input_ids=enc)` or `generate(enc)` with `enc` a BatchEncoding (or any mapping with
    input_ids): what `tokenizer.apply_chat_template(..., return_tensors="pt")` returns under
    transformers 5, and Unsloth's notebooks pass on as input_ids. Its input_ids become the inputs
    and its attention_mask the mask (unless one is given)."""
    from collections.abc import Mapping

    key, value = (None, args[0]) if args else next(
        ((name, kwargs[name]) for name in ("input_ids", "inputs") if name in kwargs), (None, None))
    if not isinstance(value, Mapping) or "input_ids" not in value:
        return args, kwargs
    kwargs = dict(kwargs)
    if key is None:
        args = (value["input_ids"], *args[1:])
    else:
        kwargs[key] = value["input_ids"]
    if value.get("attention_mask") is not None:
        kwargs.setdefault("attention_mask", value["attention_mask"])
    return args, kwargs


@dataclass
class FastGenerate:
    """What `enable_fast_generate` decided for one model, bound into its `generate`.

    reason: why the fast path cannot take this model (None: it may); set for good on the first
    Unsupported. decoder: the static cache and CUDA graphs, made on the first call.
    """

    cuda_graphs: bool
    reason: str | None = None
    decoder: object = None


def _fast_generate(settings: FastGenerate, model, *args, **kwargs):
    """`model.generate` after `enable_fast_generate`: the static-cache path when it takes the call."""
    args, kwargs = unwrap_encoding(args, kwargs)
    reason = settings.reason or model_reason(model)
    call = None if reason else resolve_call(model, args, kwargs)
    if isinstance(call, str):
        reason = call
    if reason:
        return _fall_back(model, reason, args, kwargs)
    try:
        decoder = settings.decoder
        if decoder is None:
            decoder = settings.decoder = Decoder(model, cuda_graphs=settings.cuda_graphs)
        with torch.no_grad():
            out = decoder.generate(call)
    except Unsupported as error:
        settings.reason = str(error)  # a property of the model: no second attempt
        return _fall_back(model, str(error), args, kwargs)
    if record_of(model).generate_path != decoder.path:
        logger.info("generate: %s", decoder.path)
    record_of(model).generate_path = decoder.path
    return out


def enable_fast_generate(model, cuda_graphs: bool = True):
    """Make `model.generate` (and a peft wrapper's) take the static-cache path where it applies.

    The patch is an attribute of the transformers model instance (peft's generate reaches it
    through its wrappers); `disable_fast_generate` removes it and frees the cache and graph.
    """
    inner = _inner(model)
    reason = None
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        reason = f"peft {type(peft_config).__name__} adapters (prompt learning)"
    disable_fast_generate(model)
    inner.generate = types.MethodType(functools.partial(_fast_generate, FastGenerate(cuda_graphs, reason)), inner)
    return model


def disable_fast_generate(model):
    """Undo `enable_fast_generate`: transformers' generate again, the cache and graph released."""
    inner = _inner(model)
    bound = vars(inner).get("generate")
    if isinstance(bound, types.MethodType) and getattr(bound.__func__, "func", None) is _fast_generate:
        del inner.generate  # the cache and graphs go with the FastGenerate bound into it
    return model

