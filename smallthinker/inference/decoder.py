"""Batch-1 decode in one native call per token: `generate()` on a converted model without per-op overhead.

`formats.quantize_model` converts a model to bf16 / int8 / int4 matrices; with the native kernels built here it
also turns the model into a `NativeDecodeForCausalLM` (same weights, same modules, one more code path). Its
`generate()` then keeps keys and values in a `NativeKVCache`, preallocated bf16 buffers that grow by doubling, and:

- a prompt (several tokens) runs through the model's own forward, GEMMs and all, writing into those buffers;
- each new token runs through `NativeDecoder.step`: one call into `kernels/decoder.cpp` computing embedding, all
  layers and the LM head on the weights the model already holds (no copies), with no Python in between.

Any other call (batches, padding, hidden states or router logits requested, a `DynamicCache`, training) takes the
per-op path unchanged. The native step rounds to bf16 exactly where the model does, so its logits equal the per-op
path's up to fp32 summation order (tests/inference/test_decoder.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from smallthinker.inference import native
from smallthinker.modeling import SmallThinkerConfig, SmallThinkerForCausalLM
from smallthinker.modeling.modeling_smallthinker import SmallThinkerCausalLMOutput

INITIAL_CAPACITY = 256  # tokens of K/V per layer allocated at first use; doubled whenever it runs out


class NativeKVLayer(CacheLayerMixin):
    """One layer's keys and values in a preallocated bf16 buffer [1, kv_heads, capacity, head_dim].

    Holds every position, sliding-window layers included (their mask and the native step read only the window),
    so that positions stay absolute and the native step can write token `pos` at index `pos`.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, kv_heads: int, head_dim: int, capacity: int = INITIAL_CAPACITY) -> None:
        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.length = 0
        self._allocate(capacity)
        self.is_initialized = True

    # `keys` / `values`: views of the filled positions, made when read (the per-op path reads them; a native step
    # only moves `length`, and slicing 2 x 32 tensors every token would cost a third of a millisecond).
    @property
    def keys(self) -> torch.Tensor:
        return self.buffer_keys[:, :, : self.length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        pass  # the buffers are the storage (the base class assigns None at construction)

    @property
    def values(self) -> torch.Tensor:
        return self.buffer_values[:, :, : self.length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        pass

    def _allocate(self, capacity: int) -> None:
        shape = (1, self.kv_heads, capacity, self.head_dim)
        keys, values = torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)
        if self.length:
            keys[:, :, : self.length] = self.keys
            values[:, :, : self.length] = self.values
        self.buffer_keys, self.buffer_values = keys, values

    @property
    def capacity(self) -> int:
        return self.buffer_keys.shape[2]

    def reserve(self, length: int) -> bool:
        """Make room for `length` positions; whether the buffers moved."""
        if length <= self.capacity:
            return False
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        self._allocate(capacity)
        return True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise ValueError("NativeKVCache holds one sequence; use a DynamicCache for batches")
        end = self.length + key_states.shape[2]
        self.reserve(end)
        self.buffer_keys[:, :, self.length : end] = key_states
        self.buffer_values[:, :, self.length : end] = value_states
        self.advance(end)
        return self.keys, self.values

    def advance(self, length: int) -> None:
        """Positions [0, length) are filled (the native step wrote the last one in place)."""
        self.length = length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.advance(0)

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length + max_length
        self.advance(min(self.length, max_length))


class NativeKVCache(Cache):
    """The KV cache of `NativeDecodeForCausalLM.generate`: one sequence, bf16, buffers shared with the native step."""

    def __init__(self, config: SmallThinkerConfig, capacity: int = INITIAL_CAPACITY) -> None:
        layers = [
            NativeKVLayer(config.num_key_value_heads, config.head_dim, capacity)
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self._bound: object | None = None  # the native decoder the buffers were last handed to

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)


def native_decode_supported(model: SmallThinkerForCausalLM) -> bool:
    """Whether every matrix of `model` is in a layout the native step reads (a `quantize_model` result on the
    native path, experts resident or offloaded)."""
    from smallthinker.inference.formats import QuantizedExperts, QuantizedMatrix

    if not native.available() or model.model.embed_tokens.weight.dtype != torch.bfloat16:
        return False
    for layer in model.model.layers:
        attn = layer.self_attn
        mats = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        if not all(isinstance(m, QuantizedMatrix) and m.path == "native" for m in mats):
            return False
        if layer.block_sparse_moe.primary_router.weight.dtype != torch.bfloat16:
            return False
        experts = layer.block_sparse_moe.experts
        if isinstance(experts, QuantizedExperts) and experts.fused is None:
            return False
    head = model.lm_head
    return isinstance(head, QuantizedMatrix) and head.path == "native"


# An offloaded model's per-layer step: (decoder class instance, layer, position) -> None; it routes, brings the
# experts in, and runs attention and the experts (`engine.OffloadEngine.native_layer`).
LayerStep = Callable[[object, int, int], None]


class NativeDecoder:
    """The C++ decoder (`torch.classes.smallthinker.Decoder`) bound to a converted model's weights (no copies).

    Resident experts: a step is one call. Offloaded experts: `layer_step` runs each layer, fetching the experts
    between routing and attention's end."""

    def __init__(
        self,
        model: SmallThinkerForCausalLM,
        namespace: str = native.NAMESPACE,
        layer_step: LayerStep | None = None,
    ) -> None:
        """`namespace`: the op library the class is taken from (`native.load(march, namespace)`; tests load
        every SIMD branch under its own)."""
        from smallthinker.inference.formats import QuantizedExperts

        if not native_decode_supported(model):
            raise ValueError(
                "native decode needs a model converted by formats.quantize_model on the native kernels "
                "(compiled here; see smallthinker.inference.native)"
            )
        config = model.config
        inner = model.model
        ints = [
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.moe_num_primary_experts,
            config.moe_num_active_primary_experts,
            int(bool(config.moe_primary_router_apply_softmax)),
        ]
        head_w, head_aux = model.lm_head.kernel_tensors()
        self.impl = getattr(torch.classes, namespace).Decoder(
            ints,
            float(config.rms_norm_eps),
            inner.rotary_emb.inv_freq.float(),
            inner.embed_tokens.weight,
            inner.norm.weight,
            head_w,
            head_aux,
        )
        self.resident_experts = True
        empty = torch.empty(0)
        for i, layer in enumerate(inner.layers):
            attn, moe = layer.self_attn, layer.block_sparse_moe
            tensors = [
                layer.input_layernorm.weight,
                layer.post_attention_layernorm.weight,
                moe.primary_router.weight,
            ]
            for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                tensors += m.kernel_tensors()
            if isinstance(moe.experts, QuantizedExperts):
                tensors += list(moe.experts.fused)
            else:  # offloaded: the engine hands the experts over per step
                tensors += [empty] * 4
                self.resident_experts = False
            window = config.sliding_window_size if config.sliding_window_layout[i] else 0
            self.impl.add_layer(tensors, int(bool(config.rope_layout[i])), int(window))
        self.num_layers = config.num_hidden_layers
        self.layer_step = layer_step
        if not self.resident_experts and layer_step is None:
            raise ValueError("a model with offloaded experts needs the engine's layer_step for native decode")

    def bind(self, cache: NativeKVCache) -> None:
        """Point the decoder at `cache`'s buffers (after they were (re)allocated)."""
        for i, layer in enumerate(cache.layers):
            self.impl.set_cache(i, layer.buffer_keys, layer.buffer_values)
        cache._bound = self

    @torch.no_grad()
    def step(self, token: int, cache: NativeKVCache) -> torch.Tensor:
        """Logits [1, 1, V] (bf16) of `token` at the next position of `cache`, whose K/V it appends."""
        pos = cache.get_seq_length()
        if pos + 1 > cache.layers[0].capacity:  # every layer has the same capacity
            for layer in cache.layers:
                layer.reserve(pos + 1)
            cache._bound = None
        if cache._bound is not self:
            self.bind(cache)
        if self.layer_step is None:
            logits = self.impl.step(int(token), pos)
        else:
            self.impl.embed(int(token))
            for layer in range(self.num_layers):
                self.layer_step(self.impl, layer, pos)
            logits = self.impl.head()
        for layer in cache.layers:
            layer.length = pos + 1
        return logits


class NativeDecodeForCausalLM(SmallThinkerForCausalLM):
    """`SmallThinkerForCausalLM` whose single-token steps on a `NativeKVCache` run natively (see module doc).

    Made by `enable_native_decode` (class swap on a converted model); `generate()` picks the native cache by itself.
    """

    native_decoder: NativeDecoder

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, *args
    ):
        wants_default = (
            model_kwargs.get("cache") is None
            and generation_config.cache_implementation is None
            and generation_config.use_cache is not False
            and batch_size == 1
            and max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) == 1
        )
        if wants_default:
            model_kwargs["cache"] = NativeKVCache(self.config)
            return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, *args
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> SmallThinkerCausalLMOutput:
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        if self._native_step_applies(input_ids, attention_mask, position_ids, cache, kwargs):
            logits = self.native_decoder.step(int(input_ids.reshape(-1)[0]), cache)
            return SmallThinkerCausalLMOutput(logits=logits, cache=cache)
        return super().forward(input_ids, attention_mask, position_ids, cache, **kwargs)

    # `generate` reads the signature to decide what to pass (`logits_to_keep` among it): the parent's, unchanged.
    forward.__signature__ = inspect.signature(SmallThinkerForCausalLM.forward)

    def _native_step_applies(self, input_ids, attention_mask, position_ids, cache, kwargs) -> bool:
        if not isinstance(cache, NativeKVCache) or input_ids is None or input_ids.numel() != 1:
            return False
        if self.training or torch.is_grad_enabled():  # the native step has no backward
            return False
        if kwargs.get("inputs_embeds") is not None or kwargs.get("labels") is not None:
            return False
        wanted = ("output_router_logits", "output_hidden_states", "output_attentions")
        if any(kwargs.get(k) for k in wanted):
            return False
        if self.config.output_router_logits:
            return False
        if (
            attention_mask is not None
            and not isinstance(attention_mask, dict)
            and not bool(attention_mask.all())
        ):
            return False  # padding: the per-op path applies the mask
        if position_ids is not None and int(position_ids.reshape(-1)[-1]) != cache.get_seq_length():
            return False
        return True


def enable_native_decode(model: SmallThinkerForCausalLM, layer_step: LayerStep | None = None) -> bool:
    """Give `model` the native decode step when its weights allow it here; whether it did. A model with offloaded
    experts needs its engine's `layer_step` (without one it keeps the per-op path)."""
    if not native_decode_supported(model):
        return False
    offloaded = any(not _resident(layer.block_sparse_moe.experts) for layer in model.model.layers)
    if offloaded and layer_step is None:
        return False
    decoder = NativeDecoder(model, layer_step=layer_step)
    model.__class__ = NativeDecodeForCausalLM
    model.native_decoder = decoder
    return True


def _resident(experts) -> bool:
    from smallthinker.inference.formats import QuantizedExperts

    return isinstance(experts, QuantizedExperts)


def decode_cache(model: SmallThinkerForCausalLM) -> Cache:
    """The KV cache `generate()` gives one sequence of `model`: the native buffers where it has the native step."""
    if isinstance(model, NativeDecodeForCausalLM):
        return NativeKVCache(model.config)
    return DynamicCache(config=model.config)
