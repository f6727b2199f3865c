"""One benchmark measurement in a fresh process; prints one JSON line (the last line of stdout).

    python bench/worker.py speed --side ours --model PATH --steps 10     # our QLoRAPlugin + Lightning
    python bench/worker.py speed --side peer --model PATH --steps 10     # transformers + bnb + PEFT loop
    python bench/worker.py quality --side qlora --steps 30                # eval loss after QLoRA / 16-bit LoRA
    python bench/worker.py speed --side ours --model random:llama3-8b --device cuda   # built in-process, no files
    python bench/worker.py gpu-paths                                      # the GPU paths import (CPU is enough)

``bench/run.py`` calls this; each run gets its own process so that peak memory (``ru_maxrss``)
and allocator state never leak from one measurement into the next.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

START = time.perf_counter()

if __package__ in (None, ""):
    # Run as a script (`python bench/worker.py`): make `bench` importable from the repo root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    LORA,
    LR,
    ROOT,
    bnb_cpu_kernel,
    checkpoint_mode,
    hwm_mib,
    loadavg,
    median,
    peak_rss_mib,
    pin_mmap_threshold,
    quiet_trainer,
    random_batches,
    reset_hwm,
    rss_mib,
)


class StepLog:
    """Wall and CPU time of each training step, its loss, and memory marks around the loop."""

    def __init__(self, warmup: int, device: str, profile: str | None, steps: int) -> None:
        import torch

        self.torch = torch
        self.warmup = warmup
        self.cuda = device == "cuda"
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []
        self.faults: list[int] = []
        self.sys: list[float] = []
        self.info: dict[str, Any] = {}
        self.profile_path = profile
        self.profiler = None
        if profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            # Profile only the timed steps, the same ones on both sides.
            schedule = torch.profiler.schedule(wait=warmup, warmup=0, active=max(1, steps - warmup), repeat=1)
            self.profiler = torch.profiler.profile(activities=activities, schedule=schedule)

    def train_start(self, model) -> None:
        """Called once the model is ready, right before the first step."""
        self.info["setup_s"] = round(time.perf_counter() - START, 2)
        self.info["rss_before_train_mib"] = round(rss_mib(), 1)
        self.info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.info["gradient_checkpointing"] = checkpoint_mode(model)
        self.info["bnb_cpu_kernel"] = bnb_cpu_kernel(model)
        # Resetting the peak mark resets ru_maxrss too (both read the kernel's hiwater_rss): keep the setup's.
        self.info["setup_peak_rss_mib"] = round(peak_rss_mib(), 1)
        self.info["hwm_reset"] = reset_hwm()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.info["gpu_before_train_mib"] = round(self.torch.cuda.memory_allocated() / 2**20, 1)
            self.info["setup_peak_gpu_mib"] = round(self.torch.cuda.max_memory_allocated() / 2**20, 1)
            self.torch.cuda.reset_peak_memory_stats()
        if self.profiler is not None:
            self.profiler.start()

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._usage = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self, loss) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        self.wall.append(time.perf_counter() - self._wall)
        # process_time counts every thread of this process: less sensitive to other load than wall time.
        self.cpu.append(time.process_time() - self._cpu)
        # Page faults and kernel time: memory handed back to the OS and faulted in again shows up here.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.faults.append(usage.ru_minflt - self._usage.ru_minflt)
        self.sys.append(usage.ru_stime - self._usage.ru_stime)
        self.losses.append(float(loss))
        if self.profiler is not None:
            self.profiler.step()

    def result(self, model, tokens_per_step: int) -> dict[str, Any]:
        if self.profiler is not None:
            self.profiler.stop()
            table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            Path(self.profile_path).write_text(table)
        wall, cpu = self.wall[self.warmup :], self.cpu[self.warmup :]
        step = median(wall)
        out = {
            **self.info,
            "losses": [round(x, 6) for x in self.losses],
            "step_s": [round(x, 4) for x in wall],
            "step_cpu_s": [round(x, 4) for x in cpu],
            "warmup_step_s": [round(x, 4) for x in self.wall[: self.warmup]],
            "step_sys_s": [round(x, 4) for x in self.sys[self.warmup :]],
            "step_minor_faults": self.faults[self.warmup :],
            "median_step_s": step,
            "median_step_cpu_s": median(cpu),
            "tokens_per_s": tokens_per_step / step if step else None,
            # Whole process, loading and quantizing included (what ru_maxrss alone would give without the reset).
            "peak_rss_mib": round(max(peak_rss_mib(), hwm_mib(), self.info.get("setup_peak_rss_mib", 0.0)), 1),
            "train_peak_rss_mib": round(hwm_mib(), 1) if self.info.get("hwm_reset") else None,
            "bnb_cpu_kernel_after": bnb_cpu_kernel(model),
        }
        if self.cuda:
            out["train_peak_gpu_mib"] = round(self.torch.cuda.max_memory_allocated() / 2**20, 1)
            out["peak_gpu_mib"] = max(out["train_peak_gpu_mib"], self.info["setup_peak_gpu_mib"])
        return out


RANDOM_PREFIX = "random:"
# About 1B parameters (Llama-3.2-1B's body with a 32k vocabulary): the GPU tests' bf16 model.
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# The test suite's tiny Llama: runs the in-process paths on a CPU in seconds.
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def random_shape(model: str) -> dict[str, Any] | None:
    """The Llama shape named by ``random:<name>`` (llama3-8b, llama-1b, tiny); None for a directory."""
    if not model.startswith(RANDOM_PREFIX):
        return None
    from bench.random_model import LLAMA3_8B

    shapes = {"llama3-8b": LLAMA3_8B, "llama-1b": LLAMA_1B, "tiny": TINY}
    name = model.removeprefix(RANDOM_PREFIX)
    if name not in shapes:
        raise ValueError(f"--model {model!r}: unknown random shape; use random:{', random:'.join(shapes)}.")
    return dict(shapes[name])


def random_llama(
    shape: dict[str, Any] | Any,
    device: Any,
    dtype: Any,
    seed: int = 0,
    std: float = 0.02,
    on_block: Callable[[Any], None] | None = None,
) -> Any:
    """A ``LlamaForCausalLM`` of ``shape`` with seeded random weights drawn on ``device``, no file involved.

    The skeleton is built with its parameters on the meta device; each tensor is then drawn where
    it will live, in its own generator seeded from ``seed`` and its name, so any two builds with the
    same seed hold the same bits whatever else they do. ``on_block(block)`` runs right after each
    decoder block's weights exist: quantizing there keeps at most one block in 16 bits at a time
    (an 8B model never needs its 16 GB of bf16 weights at once).

    Args:
        shape: ``LlamaConfig`` keyword arguments, or a ``LlamaConfig``.
        device: Where every weight is drawn (``"cuda"``, ``"cpu"``).
        dtype: The weights' dtype (bf16 for a GPU run).
        seed: Seeds every tensor's draw.
        std: Standard deviation of the normal init (norm gains start at 1).
        on_block: Called with each decoder block once its weights are drawn.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device(device)
    config = shape if isinstance(shape, LlamaConfig) else LlamaConfig(**shape)
    # Parameters on meta; buffers (the rotary tables) computed for real, on the CPU.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    def draw(module_name: str, module: Any) -> None:
        ones = "norm" in type(module).__name__.lower()
        for leaf, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            if ones:
                data = torch.ones(param.shape, dtype=param.dtype, device=device)
            else:
                # crc32, not hash(): Python salts str hashes per process.
                gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{module_name}.{leaf}".encode()))
                data = torch.empty(param.shape, dtype=param.dtype, device=device).normal_(0.0, std, generator=gen)
            module._parameters[leaf] = torch.nn.Parameter(data, requires_grad=param.requires_grad)

    # Embeddings, final norm and head first, then one block at a time.
    for name, module in model.named_modules():
        if name != "model.layers" and not name.startswith("model.layers."):
            draw(name, module)
    for i, block in enumerate(model.model.layers):
        for name, module in block.named_modules(prefix=f"model.layers.{i}"):
            draw(name, module)
        if on_block is not None:
            on_block(block)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # the head was drawn apart from the embeddings above: share them again
    # Buffers only: Module.to would also visit the quantized weights, and transformers refuses .to()
    # on some quantized models.
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)
    return model


def _model_vocab(path: str) -> int:
    shape = random_shape(path)
    if shape is not None:
        return shape["vocab_size"]
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).vocab_size


def _lora(args: argparse.Namespace) -> dict[str, Any]:
    """The bench's LoRA settings with --r/--dropout applied; alpha stays 2r on both sides."""
    r = args.r if args.r is not None else LORA["r"]
    dropout = args.dropout if args.dropout is not None else LORA["dropout"]
    return {"r": r, "alpha": 2 * r, "dropout": dropout}


def _checkpointing(args: argparse.Namespace) -> bool | int:
    """Ours' ``gradient_checkpointing``: every layer (True), every k-th layer (--gc-every k), or none."""
    return args.gc_every if args.gc and args.gc_every else args.gc


def _threshold(args: argparse.Namespace) -> int | None:
    """The glibc mmap threshold to pin, from ``--mmap-threshold`` (None: leave glibc's dynamic one)."""
    return None if args.mmap_threshold in ("default", "glibc") else int(args.mmap_threshold)


def _pin_for_baseline(args: argparse.Namespace, log: StepLog) -> None:
    """Give the peer (and ours-loop) the allocator policy asked for; ours gets it through the plugin."""
    threshold = _threshold(args)
    if threshold is not None and args.device == "cpu":
        log.info["mmap_threshold_pinned"] = pin_mmap_threshold(threshold)


def _device(args: argparse.Namespace) -> Any:
    import torch

    # An explicit index: bitsandbytes and Lightning both place on cuda:0.
    return torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")


def random_for_ours(args: argparse.Namespace, shape: dict[str, Any]) -> Any:
    """The random model, each block quantized by our ``quantize_model`` as soon as its weights exist."""
    import torch

    from lightning_qlora import QuantConfig, quantize_model

    device = _device(args)
    config = QuantConfig()  # NF4 + double quantization; compute bf16 on the GPU, fp32 on CPU
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    # QLoRAPlugin then finds every layer quantized, as after a low-memory load, and adds the adapters.
    return random_llama(shape, device, dtype, args.seed, on_block=lambda block: quantize_model(block, config, device))


def random_for_peer(args: argparse.Namespace, shape: dict[str, Any], compute: Any) -> Any:
    """The same random model, each block quantized as transformers' bitsandbytes integration does.

    ``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant))`` swaps every Linear
    but the head for a ``Linear4bit`` built on meta, then loads each weight as
    ``Params4bit(weight, requires_grad=False, ...)`` moved to the GPU, which is what quantizes it.
    """
    import bitsandbytes as bnb
    import torch

    device = _device(args)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    def quantize(block: Any) -> None:
        linears = [(n, m) for n, m in block.named_modules() if type(m) is torch.nn.Linear]
        for name, linear in linears:
            has_bias = linear.bias is not None
            with torch.device("meta"):
                new = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    has_bias,
                    compute,
                    compress_statistics=True,
                    quant_type="nf4",
                    quant_storage=torch.uint8,
                )
            weight = bnb.nn.Params4bit(
                linear.weight.data,
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
                quant_storage=torch.uint8,
                module=new,
            )
            new.weight = weight.cuda(device) if device.type == "cuda" else weight.to(device)
            if has_bias:
                new.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            new.requires_grad_(False)
            block.set_submodule(name, new)

    model = random_llama(shape, device, dtype, args.seed, on_block=quantize)
    # What transformers' 4-bit quantizer sets: PEFT dispatches its bnb LoRA layers on it, and
    # prepare_model_for_kbit_training then upcasts the embeddings, norms and head to fp32.
    model.is_loaded_in_4bit = True
    return model


def speed_ours(args: argparse.Namespace, batches: list[dict], log: StepLog) -> Any:
    """Our stack: Trainer + QLoRAPlugin + LoRAAdapters fitting CausalLMModule."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_qlora import CausalLMModule, CPUOptions, LoRAAdapters, QLoRAPlugin, load_model

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            log.train_start(pl_module.model)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            log.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            log.stop(outputs["loss"])

    L.seed_everything(args.seed, verbose=False)
    shape = random_shape(args.model)
    if shape is not None:
        # Built in-process (the GPU case): each block quantized where it is drawn.
        model = random_for_ours(args, shape)
    elif args.device == "cuda":
        # A bf16 checkpoint loaded as it is, as the peer does; the plugin quantizes it layer by layer onto the GPU.
        model = load_model(args.model, dtype=torch.bfloat16)
    else:
        # On CPU the module loads it in fp32 itself, as a user's run would.
        model = args.model
    # min_lr_ratio=1: a constant LR, like the peer's plain AdamW, so that the loss curves compare too.
    chunk = {"auto": "auto", "none": None}.get(args.loss_chunk, args.loss_chunk)
    chunk = int(chunk) if isinstance(chunk, str) and chunk != "auto" else chunk
    module = CausalLMModule(model, lr=LR, warmup_steps=0, min_lr_ratio=1.0, loss_chunk_size=chunk)
    # "default": the plugin's own CPU allocator policy; "glibc": none; a number: that threshold.
    kwargs = {} if args.mmap_threshold == "default" else {"mmap_threshold": _threshold(args)}
    # --no-reuse: stock bitsandbytes/PEFT layers in the recompute (lightning_qlora.cpu.recompute), for an A/B;
    # --no-fast-dropout: torch's bernoulli_ masks instead of lightning_qlora.cpu.dropout's.
    kwargs["release_memory"] = args.release
    plugin = QLoRAPlugin(cpu=CPUOptions(reuse_recompute=args.reuse, fast_dropout=args.fast_dropout, **kwargs))
    trainer = quiet_trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        plugins=[plugin],
        callbacks=[LoRAAdapters(**_lora(args), gradient_checkpointing=_checkpointing(args)), Timer()],
        max_steps=args.steps,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    log.info["compute_dtype"] = str(trainer.precision_plugin.compute_dtype).removeprefix("torch.")
    log.info["precision"] = trainer.precision_plugin.precision
    return module.model


def speed_peer(args: argparse.Namespace, batches: list[dict], log: StepLog) -> Any:
    """The usual stack: from_pretrained(BitsAndBytesConfig) + prepare_model_for_kbit_training + get_peft_model."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    set_seed(args.seed)
    _pin_for_baseline(args, log)
    cuda = args.device == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    shape = random_shape(args.model)
    if shape is not None:
        model = random_for_peer(args, shape, compute)
    else:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        model = AutoModelForCausalLM.from_pretrained(
            args.model, quantization_config=quant, device_map={"": 0 if cuda else "cpu"}, dtype=compute
        )
    if args.peer_cpu_bf16 == "off":
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    # PEFT's default leaves torch's reentrant checkpointing; "non-reentrant" matches what ours uses.
    gc_kwargs = {"use_reentrant": False} if args.peer_gc == "non-reentrant" else None
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=args.gc, gradient_checkpointing_kwargs=gc_kwargs
    )
    lora = LoraConfig(
        r=_lora(args)["r"],
        lora_alpha=_lora(args)["alpha"],
        lora_dropout=_lora(args)["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()  # from_pretrained returns eval mode; training loops (HF Trainer too) switch to train
    # weight_decay=0: ours' default and HF Trainer's (torch's AdamW would default to 0.01).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    # HF Trainer with bf16=True autocasts the step; that is what the usual GPU recipe runs.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]  # Lightning moves it before the timer
    log.info["compute_dtype"] = str(compute).removeprefix("torch.")
    log.info["precision"] = "bf16 autocast" if cuda else "fp32"
    log.train_start(model)
    for batch in batches:
        log.start()
        with autocast:
            # use_cache=False as our module passes: a training step has no use for a KV cache.
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.stop(loss.detach())
    return model


def speed_ours_loop(args: argparse.Namespace, batches: list[dict], log: StepLog) -> Any:
    """Diagnostic: our ``prepare()`` and our loss in the peer's plain loop, to separate Lightning's share."""
    import torch
    from transformers import set_seed

    from lightning_qlora import CausalLMModule, CPUOptions, load_model, prepare

    set_seed(args.seed)
    _pin_for_baseline(args, log)
    model = load_model(args.model)
    # release_memory=False: the loop measures the layers, as before prepare() learned the plugin's trim.
    cpu = CPUOptions(fast_dropout=args.fast_dropout, release_memory=False)
    prepare(model, **_lora(args), gradient_checkpointing=args.gc, cpu=cpu, verbose=False)
    module = CausalLMModule(model)  # for its loss path; puts the model in train mode
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    log.info["compute_dtype"] = "float32"
    log.info["loss"] = args.loss
    log.train_start(model)
    for batch in batches:
        log.start()
        if args.loss == "hf":
            loss = model(**batch, use_cache=False).loss
        else:
            nll, count = module._loss_sums(batch)
            loss = nll / count.clamp(min=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.stop(loss.detach())
    return model


def speed(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; none is visible.")
    before = loadavg()
    rss_imports = rss_mib()
    batches = random_batches(_model_vocab(args.model), args.steps, args.batch, args.seq, args.seed)
    log = StepLog(args.warmup, args.device, args.profile, args.steps)
    run = {"ours": speed_ours, "peer": speed_peer, "ours-loop": speed_ours_loop}[args.side]
    model = run(args, batches, log)
    return {
        "case": "speed",
        "side": args.side,
        "model": args.model,
        # random:<shape>: weights drawn in-process (seeded by --seed), identical on both sides.
        "model_shape": random_shape(args.model),
        "device": args.device,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch": args.batch,
        "seq": args.seq,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "gc": _checkpointing(args) if args.side == "ours" else args.gc,
        "lora": _lora(args),
        "peer_cpu_bf16": args.peer_cpu_bf16 if args.side == "peer" else None,
        "peer_gc": args.peer_gc if args.side == "peer" else None,
        "mmap_threshold": args.mmap_threshold,
        "reuse_recompute": args.reuse if args.side == "ours" else None,
        "fast_dropout": args.fast_dropout if args.side == "ours" else None,
        "loss_chunk": args.loss_chunk if args.side == "ours" else None,
        "rss_imports_mib": round(rss_imports, 1),
        **log.result(model, args.batch * args.seq),
        "total_s": round(time.perf_counter() - START, 2),
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }


def gpu_paths(args: argparse.Namespace) -> dict[str, Any]:
    """Import everything the GPU case runs and build the 8B skeleton on meta: a CPU check of those paths."""
    import accelerate
    import bitsandbytes
    import peft
    import torch
    import transformers
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_qlora import CausalLMModule, LoRAAdapters, QLoRAPlugin, QuantConfig, quantize_model  # noqa: F401

    shape = random_shape(args.model)
    if shape is None:
        raise SystemExit(f"gpu-paths checks a random:<shape> model, not {args.model!r}.")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return {
        "case": "gpu-paths",
        "model": args.model,
        "params": sum(p.numel() for p in model.parameters()),
        "quantized_linears": len(linears),
        "bnb_linear4bit": hasattr(bitsandbytes.nn, "Linear4bit") and hasattr(bitsandbytes.nn, "Params4bit"),
        "cuda": torch.cuda.is_available(),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, peft, bitsandbytes, accelerate)},
    }


def quality(args: argparse.Namespace) -> dict[str, Any]:
    """Fit the medical recipe's sample for ``--steps`` with QLoRA or 16-bit LoRA; eval loss before and after."""
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir

    from lightning_qlora import (
        AdapterConfig,
        CausalLMModule,
        CPUOptions,
        LoRAAdapters,
        QLoRAPlugin,
        add_adapters,
        load_model,
    )
    from lightning_qlora.app.build import build_data
    from lightning_qlora.app.splits import load_splits
    from lightning_qlora.io.models import load_tokenizer
    from lightning_qlora.tasks.data import get_task

    torch.set_num_threads(args.threads)
    before_load = loadavg()
    cuda = torch.cuda.is_available() and args.device == "cuda"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        overrides = ["recipe=medical", f"seed={args.seed}", f"data.batch_size={args.batch}"]
        cfg = compose("config", overrides=overrides + ([f"data.task={args.task}"] if args.task else []))
    cfg.data.sample_dir = str(ROOT / cfg.data.sample_dir)  # the recipe's path is relative to the repo root
    L.seed_everything(args.seed, verbose=False)
    task = get_task(cfg.data.task)
    splits, source = load_splits(cfg.data, task, args.seed)
    dm = build_data(cfg, task, load_tokenizer(args.model), splits)
    t = cfg.trainer
    optim = dict(lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps)
    gc = args.gc
    if args.side == "qlora":
        module = CausalLMModule(args.model, **optim)
        plugin = QLoRAPlugin(cpu=CPUOptions(fast_dropout=args.fast_dropout))
        plugins, callbacks, precision = [plugin], [LoRAAdapters(**LORA, gradient_checkpointing=gc)], None
    else:
        # 16-bit LoRA: the same adapters on the unquantized base (fp32 on CPU, bf16 autocast on GPU).
        model = load_model(args.model).train()
        add_adapters(model, AdapterConfig(**LORA, gradient_checkpointing=gc))
        module = CausalLMModule(model, **optim)
        plugins, callbacks, precision = [], [], ("bf16-mixed" if cuda else "32-true")

    losses: list[float] = []
    seen: dict[str, float] = {}

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            # Same seed and RNG order on both sides should give the same LoRA A init: check it.
            a = [p for n, p in pl_module.named_parameters() if "lora_A" in n]
            seen["lora_a_sum"] = float(sum(p.detach().double().abs().sum() for p in a))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(round(float(outputs["loss"]), 5))

    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=precision,
        plugins=plugins,
        callbacks=[*callbacks, Record()],
        max_steps=args.steps,
        gradient_clip_val=t.gradient_clip_val,
        # Validate only through the explicit calls below, never during fit.
        check_val_every_n_epoch=None,
        val_check_interval=args.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    val_before = trainer.validate(module, dm, verbose=False)[0]
    fit_start = time.perf_counter()
    trainer.fit(module, dm)
    fit_s = time.perf_counter() - fit_start
    val_after = trainer.validate(module, dm, verbose=False)[0]
    return {
        "case": "quality",
        "side": args.side,
        "model": args.model,
        "data": source,
        "task": cfg.data.task,
        "device": "cuda" if cuda else "cpu",
        "steps": args.steps,
        "batch": args.batch,
        "max_length": cfg.data.max_length,
        "lr": t.lr,
        "warmup_steps": t.warmup_steps,
        "gradient_clip_val": t.gradient_clip_val,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "gc": gc,
        "fast_dropout": args.fast_dropout if args.side == "qlora" else None,
        "precision": trainer.precision_plugin.precision,
        "val_before": {k: round(float(v), 5) for k, v in val_before.items()},
        "val_after": {k: round(float(v), 5) for k, v in val_after.items()},
        "train_losses": losses,
        **seen,
        "fit_s": round(fit_s, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "total_s": round(time.perf_counter() - START, 1),
        "loadavg_before": before_load,
        "loadavg_after": loadavg(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="case", required=True)
    sp = sub.add_parser("speed", help="time training steps of one side")
    sp.add_argument("--side", choices=("ours", "peer", "ours-loop"), required=True, help="ours-loop: diagnostic")
    sp.add_argument(
        "--model",
        required=True,
        help="a transformers model directory, or random:llama3-8b|llama-1b|tiny (built in-process, no files)",
    )
    sp.add_argument("--steps", type=int, default=10)
    sp.add_argument("--warmup", type=int, default=2, help="first steps left out of the timings")
    sp.add_argument("--batch", type=int, default=2)
    sp.add_argument("--seq", type=int, default=128)
    sp.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    sp.add_argument("--peer-cpu-bf16", choices=("stock", "off"), default="stock", help="peer's bnb AVX512-BF16 path")
    sp.add_argument("--profile", help="write a torch.profiler table of the timed steps to this file")
    sp.add_argument("--peer-gc", choices=("default", "non-reentrant"), default="default", help="peer's checkpointing")
    sp.add_argument(
        "--mmap-threshold",
        default="default",
        help="glibc allocator policy on CPU: 'default' (each stack as shipped: ours trims the heap after each"
        " step, the peer leaves glibc as it is), 'glibc' (neither pins), or bytes to pin on both sides",
    )
    sp.add_argument("--loss", choices=("ours", "hf"), default="ours", help="ours-loop: which loss path")
    sp.add_argument(
        "--loss-chunk", default="auto", help="ours: CausalLMModule(loss_chunk_size=...): auto, none or tokens"
    )
    sp.add_argument(
        "--release", action=argparse.BooleanOptionalAction, default=True, help="ours: CPUOptions(release_memory=...)"
    )
    sp.add_argument("--gc-every", type=int, help="ours: checkpoint every k-th layer only (selective checkpointing)")
    sp.add_argument("--r", type=int, help=f"LoRA rank on both sides (default {LORA['r']}; alpha = 2r)")
    sp.add_argument("--dropout", type=float, help=f"LoRA dropout on both sides (default {LORA['dropout']})")
    sp.add_argument(
        "--reuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours: CPUOptions(reuse_recompute=...) (default on)",
    )
    sp.add_argument(
        "--fast-dropout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours: CPUOptions(fast_dropout=...), 8-bit dropout mask draws (default on)",
    )
    qp = sub.add_parser("quality", help="eval loss after QLoRA or 16-bit LoRA on the medical sample")
    qp.add_argument("--side", choices=("qlora", "lora16"), required=True)
    qp.add_argument("--model", default="smollm2-135m-instruct")
    qp.add_argument("--steps", type=int, default=30)
    qp.add_argument("--batch", type=int, default=4)
    qp.add_argument("--task", help="data.task override (default: the medical recipe's)")
    qp.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    qp.add_argument(
        "--fast-dropout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="qlora: CPUOptions(fast_dropout=...)",
    )
    gp = sub.add_parser("gpu-paths", help="import the GPU case's code and build its model on meta (runs on CPU)")
    gp.add_argument("--model", default="random:llama3-8b")
    for p in (sp, qp):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--gc", action=argparse.BooleanOptionalAction, default=True, help="gradient checkpointing")
    args = parser.parse_args(argv)
    if args.case == "speed" and args.mmap_threshold not in ("default", "glibc") and not args.mmap_threshold.isdigit():
        parser.error(f"--mmap-threshold={args.mmap_threshold!r}: use 'default', 'glibc' or a number of bytes.")
    if args.case == "speed" and args.gc_every is not None and (args.gc_every < 1 or args.side != "ours"):
        parser.error(f"--gc-every={args.gc_every}: give ours' layer stride k >= 1 (e.g. 2), with --side ours.")
    if args.case in ("speed", "gpu-paths"):
        try:
            random_shape(args.model)
        except ValueError as err:
            parser.error(str(err))
    if args.case == "speed" and args.side == "ours-loop" and random_shape(args.model) is not None:
        parser.error("--side ours-loop loads a model directory; random:<shape> is for ours and peer.")
    if args.case == "speed" and not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup={args.warmup} must be in [0, --steps={args.steps}) so that some steps are timed.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Library chatter goes to stderr; stdout's last line is the result.
    warnings.filterwarnings("ignore", message=".*use_reentrant.*")
    result = {"speed": speed, "quality": quality, "gpu-paths": gpu_paths}[args.case](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
