"""A random-weight checkpoint of a large model's shape, written tensor by tensor.

The GPU case needs a Llama-3-8B-shaped model, but no hub is reachable and the full model
never fits in memory in fp32. Building it on the meta device gives the names and shapes;
each tensor is then drawn, cast to bf16 and written into ~4 GB safetensors shards, so the
peak memory is one shard. Both sides then load the same directory with ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json), without the RoPE scaling of 3.1.
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)


def is_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` already holds a complete checkpoint (its index is written last)."""
    return (directory / "config.json").is_file() and (
        (directory / "model.safetensors.index.json").is_file() or (directory / "model.safetensors").is_file()
    )


def write_random_llama(
    directory: str | Path,
    shape: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    std: float = 0.02,
    seed: int = 0,
    shard_bytes: int = 4 << 30,
) -> Path:
    """Write a random ``LlamaForCausalLM`` of ``shape`` (default Llama-3-8B) to ``directory``; returns it."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    if is_checkpoint(directory):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**(shape or LLAMA3_8B), dtype=dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        # Each parameter once: a tied head shares the embedding, so the file holds only the
        # embedding, as transformers saves a tied model (a second, different head would leave
        # from_pretrained untied and low-memory loading tied: two models).
        saved = model.state_dict().keys()  # persistent buffers only, unlike named_buffers()
        named = [*model.named_parameters(), *model.named_buffers()]
        shapes = {k: v.shape for k, v in named if k in saved}
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    count = total = size = 0

    def flush() -> None:
        nonlocal shard, size, count
        if shard:
            count += 1
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, size_ in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(size_, dtype=dtype)  # RMSNorm gains start at 1
        else:
            tensor = torch.empty(size_, dtype=torch.float32).normal_(0, std, generator=gen).to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    # The shard count is known only now: rename to transformers' n-of-N form.
    final = {}
    for i in range(1, count + 1):
        src = directory / f"model-{i:05d}.safetensors"
        dst = directory / f"model-{i:05d}-of-{count:05d}.safetensors"
        src.rename(dst)
        final[src.name] = dst.name
    weight_map = {k: final[v] for k, v in weight_map.items()}
    config.save_pretrained(directory)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    # Written last: is_checkpoint() trusts a directory only once its index exists.
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory
