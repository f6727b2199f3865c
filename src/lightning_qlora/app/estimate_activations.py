"""What a training step's activations hold, per token and decoder layer, and what the allocator keeps of it.

Two allocator behaviours matter, and they differ by a factor of two or more:

- ``"returning"``: freed memory is reused or handed back at once (PyTorch's CUDA caching allocator;
  glibc with a pinned mmap threshold, ``CPUOptions(mmap_threshold=65536)``). The peak is the live
  set at the worst moment: the start of the loss backward, or one layer's recompute.
- ``"glibc"``: glibc's default dynamic mmap threshold, the CPU default (``CPUOptions()``). After the
  first frees, every buffer up to 32 MiB (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit) comes from the
  heap, and what the heap held once stays resident: a layer's activations freed in the backward
  are not reused by the next layer's, so one step's worth of them all stays in RSS (trimmed only
  when it creeps, by ``CreepGuard``). Buffers above 32 MiB (the full-sequence logits) are mapped
  on their own and come and go.
"""

from __future__ import annotations

from collections.abc import Sequence

ALLOCATORS = ("glibc", "returning")
# Under reentrant checkpointing (the CPU default in one process, CPUOptions.reentrant_checkpoint), the
# share of the recomputed tensors that glibc's heap still holds at the peak. Fitted to the
# checkpointed rows of bench/results/estimate_vs_measured.json that are not held out; the held-out
# rows test it. Non-reentrant checkpointing (DDP, FSDP) keeps all of them (1.0).
REENTRANT_HEAP_SHARE = 0.65
# With no dropout, adapters on layers that read the same tensor keep that one tensor.
_SHARED_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}


def _core_widths(hidden: int, intermediate: int, q: int, kv: int) -> int:
    # q and k after RoPE, v, the attention output, the post-attention residual (norm input),
    # gate, SiLU(gate) and up.
    return 2 * q + 2 * kv + hidden + 3 * intermediate


def layer_saved_per_token(
    dims: tuple[int, int, int, int, int],
    adapters: Sequence[tuple[str, int]],
    r: int,
    dropout: float,
    a: int,
    packed_masks: bool = False,
) -> float:
    """Bytes autograd saves per token inside one decoder layer (its input excluded).

    Args:
        dims: ``(hidden, intermediate, q width, kv width, heads)``.
        adapters: ``(leaf name, input width)`` of the layer's adapters.
        r: LoRA rank.
        dropout: LoRA dropout.
        a: Bytes per activation element.
        packed_masks: The dropout masks are kept at one bit per element (the CPU fast path's
            ``ReplayDropout`` inside checkpointed blocks) instead of torch's float mask.
    """
    h, i, q, kv, nh = dims
    # Plus fp32 log-sum-exp per head and the two norms' 1/rms.
    saved = _core_widths(h, i, q, kv) * a + (nh + 2) * 4
    if dropout > 0:
        # Each adapter keeps its dropped input, and its mask: a float tensor, or one bit per element.
        widths = sum(width for _, width in adapters)
        saved += widths * a + (widths / 8 if packed_masks else widths * a)
    else:
        # lora_A keeps its input: shared by q/k/v and by gate/up; o_proj's is the attention output.
        inputs = {_SHARED_INPUT.get(leaf, leaf): width for leaf, width in adapters if leaf != "o_proj"}
        saved += sum(inputs.values()) * a
    return saved + len(adapters) * r * a


def layer_grads_per_token(dims: tuple[int, int, int, int, int], adapters: Sequence[tuple[str, int]], a: int) -> float:
    """Bytes of activation gradients one decoder layer's backward allocates per token.

    One gradient per saved core tensor, and one per adapter input (each adapter's lora_A sends a
    gradient back to its input, summed into the layer's).
    """
    h, i, q, kv, _ = dims
    return (_core_widths(h, i, q, kv) + sum(width for _, width in adapters)) * a


def heap_resident(
    per_layer: Sequence[tuple[float, float, float]],
    tokens: int,
    checkpointing: bool | Sequence[bool],
    reentrant: bool = False,
) -> float:
    """Activation bytes glibc's default heap holds at a step's peak (layer inputs and logits excluded).

    Args:
        per_layer: ``(saved with float masks, saved as recomputed, gradients)`` per token, per layer.
        tokens: Tokens in the micro batch.
        checkpointing: Gradient checkpointing, for every layer or per layer (selective).
        reentrant: Reentrant checkpointing: a measured share of the recomputed tensors stays.
    """
    if isinstance(checkpointing, bool):
        checkpointing = [checkpointing] * len(per_layer)
    # A checkpointed layer's recompute lands on fresh heap; its gradients reuse what the recompute of
    # the same layer freed, but the next layer's recompute does not, so all layers' stay resident.
    # Elsewhere the forward's saved tensors are on the heap; the backward's gradients do not fit in
    # what each layer frees (freed one tensor at a time, in another order), so they stay too.
    share = REENTRANT_HEAP_SHARE if reentrant else 1.0
    return tokens * sum(share * s if c else f + g for (f, s, g), c in zip(per_layer, checkpointing, strict=True))
