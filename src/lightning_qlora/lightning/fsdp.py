"""FSDP-QLoRA: shard the frozen 4-bit base across ranks with Lightning's ``FSDPStrategy``.

Three things stand between ``QLoRAPlugin`` and stock FSDP, each handled here:

- FSDP flattens each wrapped unit's parameters into one tensor of one float dtype, so the
  packed 4-bit weights need a float ``quant_storage`` (bitsandbytes stores the same bytes
  viewed as bf16 or fp32), and the unit's other parameters that dtype too.
- ``FSDPStrategy`` takes only an ``FSDPPrecision`` (Lightning #20855), whose default
  ``MixedPrecision`` would cast the packed bytes as if they were numbers.
- Lightning's FSDP refuses CPUs and gathers full state dicts with ``offload_to_cpu=True``,
  which crashes on a CPU-only process group (gloo); CPU runs matter for tests and laptops.

Checkpoints stay adapter-only: the trainable tensors are gathered to rank 0 by name, and the
exported adapter is the same PEFT directory a single-device run writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Generator, Mapping
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from typing_extensions import override

from lightning_qlora.lightning.models import cast_frozen, find_models
from lightning_qlora.lightning.plugin import QLoRAPlugin

FSDP_INFIX = "_fsdp_wrapped_module."


def clean_name(name: str) -> str:
    """A parameter name as the unwrapped model knows it."""
    return name.replace(FSDP_INFIX, "")


class QLoRAFSDPPlugin(QLoRAPlugin, FSDPPrecision):
    """:class:`QLoRAPlugin` for ``FSDPStrategy``: the 4-bit base in float storage, so FSDP can shard it.

    Use it with :class:`QLoRAFSDPStrategy` (``trainer=fsdp`` in the CLI). Arguments as for
    ``QLoRAPlugin``, except ``quant_storage``: ``"auto"`` (the compute dtype: bf16 on GPU, fp32
    on CPU), ``"bf16"``, ``"fp16"`` or ``"fp32"``; ``uint8`` cannot be sharded.
    """

    def __init__(self, quant_storage: str | torch.dtype = "auto", **kwargs: Any) -> None:
        if str(quant_storage).removeprefix("torch.") in ("uint8", "int8"):
            raise ValueError(
                f"quant_storage={quant_storage!r}: FSDP can only shard float storage;"
                " use quant_storage='auto' (the compute dtype) or 'bf16'."
            )
        # int8 weights (Int8Params) are integer tensors, which FSDP cannot flatten with the float rest.
        if str(kwargs.get("quant_type", "nf4")).lower() == "int8":
            raise ValueError("quant_type='int8' cannot be sharded by FSDP; use quant_type='nf4' (or 'fp4') with FSDP.")
        for key in ("keep_high_precision", "int8_modules"):
            if kwargs.get(key):
                raise ValueError(
                    f"{key}={kwargs[key]!r} keeps layers in int8, which FSDP cannot shard with the 4-bit rest;"
                    f" drop {key} with FSDP, or use trainer=ddp."
                )
        self._auto_storage = quant_storage == "auto"
        self._storage_resolved = not self._auto_storage
        super().__init__(quant_storage="fp32" if self._auto_storage else quant_storage, **kwargs)
        # FSDPPrecision's init contexts read this; the model is built in fp32 and quantized later.
        self._desired_input_dtype = torch.float32
        self._adapter_keys: dict[str, dict[str, str]] = {}

    def resolve_storage(self, device: torch.device) -> None:
        """Turn ``quant_storage="auto"`` into the compute dtype on ``device``.

        Called by :class:`QLoRAFSDPStrategy` before ``configure_model``, so that a model quantized
        while loading is packed in the storage dtype FSDP will flatten.
        """
        if self._auto_storage:
            dtype = self.quant_config.resolve_compute_dtype(device)
            self.quant_config = dataclasses.replace(self.quant_config, quant_storage=dtype)
            self._storage_resolved = True

    @override
    def configs_before_setup(self) -> dict[str, dict[str, Any]]:
        configs = super().configs_before_setup()
        if not self._storage_resolved:
            # "auto" is the compute dtype of a device not known yet; the full check runs at setup.
            configs["quant"].pop("quant_storage")
        return configs

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize and add adapters (as ``QLoRAPlugin``), then give each FSDP unit one storage dtype."""
        if _is_wrapped(module):
            return module  # set up by an earlier validate/fit on this module
        trainer = getattr(module, "_trainer", None)
        self.resolve_storage(trainer.strategy.root_device if trainer is not None else torch.device("cpu"))
        super().convert_module(module)
        # PEFT names the adapter's tensors by inspecting the model, which FSDP's state-dict hooks
        # turn into collectives; so learn the names now, while the model is whole.
        self._adapter_keys = {label: _adapter_keys(m) for label, m in self.peft_models.items()}
        storage = self.quant_config.quant_storage
        for model in find_models(module).values():
            # One dtype per FSDP unit: every frozen float tensor (norms and a 16-bit compute
            # dtype's embeddings too) takes the storage dtype of the packed 4-bit weights.
            cast_frozen(model, storage, keep_norms=False, from_any=True)
            packed = {p.dtype for p in model.parameters() if not p.requires_grad and type(p) is not nn.Parameter}
            if packed - {storage}:
                raise ValueError(
                    f"the 4-bit weights are stored as {sorted(map(str, packed))}, not quant_storage={storage};"
                    " a model quantized before setup must use the plugin's quant_storage."
                )
        return module

    @override
    def _new_scaler(self) -> torch.amp.GradScaler:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # A plain GradScaler checks only this rank's shard for inf/NaN; the sharded one agrees across ranks.
        return ShardedGradScaler(device="cuda")

    @override
    def _check_strategy(self, strategy: Any) -> None:
        if not isinstance(strategy, QLoRAFSDPStrategy):
            raise ValueError(
                f"QLoRAFSDPPlugin shards the base with QLoRAFSDPStrategy, not {type(strategy).__name__};"
                " pass strategy=QLoRAFSDPStrategy(), or use QLoRAPlugin for one device or DDP."
            )

    @property
    @override
    def mixed_precision_config(self) -> None:
        # FSDP's MixedPrecision would cast the packed 4-bit bytes to param_dtype as numbers;
        # the compute dtype is applied by the bnb layers and autocast instead.
        return None

    @override
    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        # The root unit's clip_grad_norm_ takes the norm over every rank's shard (a collective);
        # torch.nn.utils.clip_grad_norm_ would see only this rank's.
        self._module.trainer.strategy.model.clip_grad_norm_(clip_val)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # QLoRAFSDPStrategy already gathered the trainable tensors (to rank 0) by their clean names.
        if self._module is not None and self.peft_models:
            self._checkpoint.save(checkpoint, self._module, self.checkpoint_meta(), weights=False)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only the check: QLoRAFSDPStrategy.load_checkpoint loads the weights, into the shards.
        if self._module is not None:
            self.check_checkpoint(checkpoint)

    def gather_trainable(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each model's adapter, whole, by PEFT's file keys, on rank 0 (empty elsewhere); all ranks call it."""
        root = self._module.trainer.strategy.model
        gathered: dict[str, dict[str, torch.Tensor]] = {}
        with summon_trainable(root, writeback=False, rank0_only=True):
            if self._module.trainer.is_global_zero:
                for label, peft_model in self.peft_models.items():
                    keys = self._adapter_keys[label]
                    gathered[label] = {
                        keys[clean_name(n)]: p.detach().cpu().clone()
                        for n, p in peft_model.named_parameters()
                        if p.requires_grad and clean_name(n) in keys
                    }
        return gathered


class QLoRAFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` for :class:`QLoRAFSDPPlugin`, on GPUs or (with gloo) CPUs.

    Defaults: ``use_orig_params=True`` (frozen and trainable tensors share units),
    ``state_dict_type="full"``, and one FSDP unit per transformer block (the model's
    ``_no_split_modules``). Other keyword arguments go to ``FSDPStrategy``.
    """

    strategy_name = "qlora_fsdp"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("use_orig_params", True)
        kwargs.setdefault("state_dict_type", "full")
        if kwargs["state_dict_type"] != "full":
            raise ValueError(
                f"state_dict_type={kwargs['state_dict_type']!r}: adapter-only checkpoints are gathered whole;"
                " use state_dict_type='full' (the adapters are small)."
            )
        if kwargs.get("use_orig_params") is False:
            raise ValueError(
                "use_orig_params=False cannot mix frozen 4-bit and trainable tensors in one unit; use True."
            )
        super().__init__(**kwargs)
        self._root: nn.Module | None = None

    @override
    @contextlib.contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # Lightning enters this around configure_model: the last moment to fix "auto" storage
        # before a model that quantizes while loading packs its weights.
        if isinstance(self.precision_plugin, QLoRAFSDPPlugin):
            self.precision_plugin.resolve_storage(self.root_device)
        with super().tensor_init_context(empty_init):
            yield

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if self._root is not None and self._root.module is model:
            # validate, then fit, on one module: Lightning hands back the bare LightningModule, whose
            # root-level weights (embeddings) only the first root unit knows how to gather.
            return self._root
        if "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = block_wrap_policy(model)
        # On CPU, FSDP needs the device given as a device: Lightning passes its index (None).
        device_id = self.root_device if self.root_device.type == "cpu" else self.root_device.index
        model = FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=device_id,
            **self.kwargs,
        )
        # Metric states are plain tensors, not parameters: FSDP does not move them (as Lightning's own setup does).
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        self._root = model
        return model

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable tensors, whole, on rank 0, by the names a single-device run saves them under."""
        module = self.lightning_module
        with summon_trainable(self.model, writeback=False, rank0_only=True):
            if not self.is_global_zero:
                return {}
            return {clean_name(n): p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)
        with self._full_state_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        from lightning_qlora.lightning.checkpoint import load_trainable_state, read_checkpoint

        path = str(self.broadcast(str(checkpoint_path)))
        checkpoint = read_checkpoint(path)
        plugin = self.precision_plugin
        assert isinstance(plugin, QLoRAFSDPPlugin)
        plugin.on_load_checkpoint(checkpoint)  # base, quantization and adapter must match, before any write
        with summon_trainable(self.model, writeback=True):
            load_trainable_state(self.lightning_module, checkpoint.pop("state_dict"), path, rename=clean_name)
        saved_states = checkpoint.pop("optimizer_states", [])
        if self.lightning_module.trainer.state.fn == "fit" and saved_states:
            for optimizer, saved in zip(self.optimizers, saved_states, strict=True):
                with self._full_state_context(rank0_only=False):
                    if saved["state"] and isinstance(next(iter(saved["state"])), int):
                        # Saved keyed by parameter id (the portable format); FSDP loads by name.
                        saved = FSDP.rekey_optim_state_dict(saved, OptimStateKeyType.PARAM_NAME, self.model)
                    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, saved))
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # loaded in load_checkpoint, inside summon_full_params

    def _full_state_context(self, rank0_only: bool = True) -> contextlib.AbstractContextManager:
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # Offloading to CPU from a CPU process group crashes in FSDP's state-dict hooks (torch 2.13).
        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        )


@contextlib.contextmanager
def summon_trainable(root: nn.Module, writeback: bool, rank0_only: bool = False) -> Generator[None, None, None]:
    """Gather, whole, only the FSDP units that hold trainable tensors: the adapters, never the base.

    ``summon_full_params`` on the root would gather every unit, the whole 4-bit base on each
    rank that asks, which is what FSDP was there to avoid. All ranks must call it.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(root, FSDP):
        # Gathering a nested unit before the root's lazy init (e.g. loading a checkpoint before
        # the first forward) would make that unit a root; summon_full_params(root) does this too.
        from torch.distributed.fsdp._runtime_utils import _lazy_init

        _lazy_init(root, root)
    with contextlib.ExitStack() as stack:
        for unit in FSDP.fsdp_modules(root):
            if any(p.requires_grad for p in _own_parameters(unit)):
                stack.enter_context(
                    FSDP.summon_full_params(unit, recurse=False, writeback=writeback, rank0_only=rank0_only)
                )
        yield


def _own_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """The parameters an FSDP unit shards itself, not those of the units nested in it."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    params, stack = [], [unit.module]
    while stack:
        module = stack.pop()
        params.extend(module.parameters(recurse=False))
        stack.extend(child for child in module.children() if not isinstance(child, FSDP))
    return params


def block_wrap_policy(module: nn.Module):
    """One FSDP unit per transformer block (``_no_split_modules``), plus one per LoRA ``Linear``.

    Raises:
        ValueError: no model in ``module`` names its blocks, so there is nothing to shard by.
    """
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    names = {n for m in find_models(module).values() for n in (getattr(m, "_no_split_modules", None) or ())}
    classes = {type(m) for m in module.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            f"{type(module).__name__} has no transformer block class (_no_split_modules) to shard by;"
            " pass QLoRAFSDPStrategy(auto_wrap_policy={YourBlockClass}), or use trainer=ddp."
        )
    blocks = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
    # LoRA weights keep fp32 master copies while a 16-bit base shares their block: their own
    # units keep every flat parameter of one dtype.
    lora = functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_trainable_leaf)
    return functools.partial(_or_policy, policies=[lora, blocks])


def _is_trainable_leaf(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.requires_grad for p in params) and not list(module.children())


def _adapter_keys(peft_model: nn.Module) -> dict[str, str]:
    """``{parameter name: key in adapter_model.safetensors}`` for ``peft_model``'s trainable tensors."""
    from peft import get_peft_model_state_dict

    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    by_ptr = {p.data_ptr(): n for n, p in params.items()}
    saved = get_peft_model_state_dict(peft_model, state_dict={n: p.detach() for n, p in params.items()})
    return {by_ptr[t.data_ptr()]: key for key, t in saved.items() if t.data_ptr() in by_ptr}


def _is_wrapped(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return any(isinstance(m, FSDP) for m in module.modules())
