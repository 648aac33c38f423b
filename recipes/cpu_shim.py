"""Monkeypatches that let NeMo 2.1.0 + megatron-core 0.10.0 run on a CPU-only torch build.

NVIDIA supports these libraries on GPUs only. On this project's CPU machines (tests, CI, smoke runs)
``llm.import_ckpt``, ``llm.finetune`` (LoRA and full SFT), checkpoint save/restore and the logits
check run once :func:`apply` has replaced the symbols listed in :data:`PATCH_TARGETS`. Each patch
is one small function below, named after what it does, with the error it avoids. They change
process-wide torch/megatron behaviour, so :func:`apply` refuses to run when CUDA is available.

Four of them (:data:`COMPAT_PATCHES`) fix problems of this pip set rather than of the missing GPU
(torch 2.13's private checkpoint-writer signature, megatron-core 0.10's load() during a LoRA
resume, the batch sampler length that makes a resumed run replay data, a forked index-build pool
that can hang inside Lightning); :func:`apply_compat` applies just those and is safe on a GPU.

Settings that are not patches (gloo, fp32, fused kernels off, ``num_workers=0``, synchronous
checkpointing) are chosen by :mod:`recipes.nemo_backend` from its ``cpu`` flag.

Ported from shared/reference/cpu-probe/cpu_patches.py, keeping only what 2.1.0 needs there
(the 2.7.x-only patches — TE placeholders in LoRA, dummy CUDA streams — are left out).
"""
from __future__ import annotations

import contextlib
import os
import importlib
import inspect
from typing import Any, Callable, Optional

# Every (module, attribute path) a patch replaces. tests/test_cpu_shim.py checks that each one
# exists in the pinned versions, so an upgrade that renames one fails loudly instead of silently
# running unpatched.
PATCH_TARGETS: tuple[tuple[str, str], ...] = (
    ("torch.cuda", "current_device"),
    ("torch.cuda", "synchronize"),
    ("torch.nn", "Module.cuda"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.fork"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.transformer.transformer_config", "TransformerConfig.__post_init__"),
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "_write_item"),
    ("megatron.core.dist_checkpointing", "load"),
    ("nemo.collections.nlp.data.language_modeling.megatron.megatron_batch_samplers",
     "BaseMegatronBatchSampler.__len__"),
    ("nemo.collections.nlp.data.language_modeling.text_memmap_dataset", "build_index_files"),
    ("nemo.lightning.io.pl", "_fix_tensors_device"),
    ("nemo.lightning.io", "apply_transforms"),
)

# (module, attribute path) -> the object that was there before apply().
ORIGINALS: dict[tuple[str, str], Any] = {}
_applied: list[str] = []  # names of the patches applied in this process, in order
_cuda_mode = None  # the TorchFunctionMode entered by _cuda_calls_to_cpu


def resolve(module: str, attr_path: str) -> tuple[Any, str, Any]:
    """(owner, name, current value) of ``module.attr_path``; raises ImportError/AttributeError."""
    owner: Any = importlib.import_module(module)
    *parents, name = attr_path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, name, getattr(owner, name)


def replace_listed(targets, originals: dict, module: str, attr_path: str, new: Any) -> None:
    """Replace ``module.attr_path``, which must be one of ``targets``, remembering the original in ``originals``
    the first time (this shim's and recipes.bridge_shim's patches)."""
    key = (module, attr_path)
    if key not in targets:
        raise KeyError(f"{module}.{attr_path} is not in PATCH_TARGETS")
    owner, name, current = resolve(module, attr_path)
    originals.setdefault(key, current)
    setattr(owner, name, new)


def _replace(module: str, attr_path: str, new: Any) -> None:
    replace_listed(PATCH_TARGETS, ORIGINALS, module, attr_path, new)


# ---------------------------------------------------------------------------------------------
# the patches


def _cuda_device_to_cpu() -> None:
    import torch
    # mcore passes device=torch.cuda.current_device() (rotary inv_freq, TP layers, loss buffers):
    # "RuntimeError: Found no NVIDIA driver" / "Torch not compiled with CUDA enabled".
    _replace("torch.cuda", "current_device", lambda: torch.device("cpu"))


def _is_cuda_device(d) -> bool:
    """A CUDA device as torch calls take it: "cuda[:N]", torch.device("cuda"), or a bare index (an int, not a
    bool) that torch reads as cuda:N."""
    import torch
    if isinstance(d, bool):
        return False
    return isinstance(d, int) or (isinstance(d, str) and d.startswith("cuda")) or \
        (isinstance(d, torch.device) and d.type == "cuda")


def cuda_to_cpu_mode():
    """A TorchFunctionMode that runs CUDA tensor work on the CPU: ``device=`` a CUDA device (tensor
    factories, ``.to``) becomes "cpu", ``Tensor.cuda()`` returns the tensor, ``pin_memory=True`` is dropped.
    Both CPU shims enter one for the whole process (recipes.bridge_shim for Megatron-Bridge)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class CudaToCpuMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.cuda:
                return args[0]
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
            return func(*args, **kwargs)

    return CudaToCpuMode()


def _cuda_calls_to_cpu() -> None:
    """Hard-coded device='cuda', .cuda() and pin_memory=True (megatron.core.optimizer scale and
    norm buffers, nemo's gpt_data_step ``val.cuda(non_blocking=True)``, MegatronParallel loss
    reduction) raise "Torch not compiled with CUDA enabled": a process-wide TorchFunctionMode
    (:func:`cuda_to_cpu_mode`) rewrites cuda devices to cpu and makes Tensor.cuda() a no-op; Module.cuda()
    and torch.cuda.synchronize() become no-ops."""
    global _cuda_mode
    _replace("torch.nn", "Module.cuda", lambda self, device=None: self)
    _replace("torch.cuda", "synchronize", lambda *a, **k: None)
    _cuda_mode = cuda_to_cpu_mode()
    _cuda_mode.__enter__()  # stays active for the main thread (where Lightning runs) until exit


def _rng_tracker_without_cuda() -> None:
    # Every attention call does `with get_cuda_rng_tracker().fork():`, and model_parallel_cuda_manual_seed
    # adds states with torch.cuda.get_rng_state(): "RuntimeError: ... CUDA" on a CPU build.
    # The CPU generator (seeded by Lightning/megatron) is used instead.
    def add(self, name, seed):
        self._is_initialized = True
        self.states_[name] = None
        self.seeds_.add(seed)

    @contextlib.contextmanager
    def fork(self, name=None):
        yield

    _replace("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add", add)
    _replace("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.fork", fork)


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's ``clip_grad_by_total_norm_fp32`` (0.10's arguments and 0.16's ``use_decoupled_grad``)
    without its ``grad.type() == 'torch.cuda.FloatTensor'`` assert and apex' multi-tensor scaling kernel."""
    import torch
    from megatron.core.utils import to_local_if_dtensor
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for p in parameters:
            g = getattr(p, "decoupled_grad" if use_decoupled_grad else "grad", None)
            if g is not None:
                to_local_if_dtensor(g).detach().mul_(clip_coeff)


def replace_clip_grads(replace: Callable[[str, str, Any], None]) -> None:
    """Put :func:`clip_grad_by_total_norm_cpu` in both of megatron-core's bindings (optimizer.py imported the
    function by name) through a shim's ``replace(module, attr_path, new)``."""
    for module in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        replace(module, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_cpu)


def _clip_grads_without_cuda_assert() -> None:
    # clip_grad_by_total_norm_fp32 asserts grad.type() == 'torch.cuda.FloatTensor' and scales with
    # apex' multi_tensor_applier: "AssertionError" at the first optimizer step with clip_grad > 0.
    replace_clip_grads(_replace)


CUDA_ONLY_FUSIONS = ("apply_rope_fusion", "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion",
                     "bias_activation_fusion", "gradient_accumulation_fusion", "cross_entropy_loss_fusion")


def post_init_without_fusions(original):
    """TransformerConfig.__post_init__ that first turns the CUDA-only fusions off (also used, only while
    a config is built, by convert.hf_to_nemo)."""
    def __post_init__(self):
        for f in CUDA_ONLY_FUSIONS:
            if getattr(self, f, False):
                setattr(self, f, False)
        original(self)
    return __post_init__


def _fusions_off() -> None:
    # Configs built inside NeMo (HFLlamaImporter.config -> LlamaConfig(apply_rope_fusion=True, ...))
    # fail in __post_init__: "ValueError: apply_rope_fusion is not available. Please install TE >= 1.4
    # or Apex." The fused kernels need CUDA anyway, so every TransformerConfig gets them off.
    from megatron.core.transformer.transformer_config import TransformerConfig

    _replace("megatron.core.transformer.transformer_config", "TransformerConfig.__post_init__",
             post_init_without_fusions(TransformerConfig.__post_init__))


def _dist_ckpt_write_item_compat() -> None:
    """Saving any checkpoint: "RuntimeError: Worker failure: _write_item() missing 2 required
    positional arguments: 'storage_key' and 'serialization_format'". mcore 0.10's
    filesystem_async calls torch's private _write_item with the pre-2.6 signature; newer torch
    (2.13 here) added leading ``transforms`` and trailing ``serialization_format`` arguments.
    A torch-version fix rather than a CPU one, applied only when the signature differs."""
    from torch.distributed.checkpoint import filesystem as tfs

    params = list(inspect.signature(tfs._write_item).parameters)
    if params[0] != "transforms":
        return
    original = tfs._write_item

    def _write_item(*args):
        if len(args) == 4:  # mcore 0.10: (stream, data, write_item, storage_key)
            return original(tfs._StorageWriterTransforms(), *args, tfs.SerializationFormat.TORCH_SAVE)
        if len(args) == 5:  # (transforms, stream, data, write_item, storage_key)
            return original(*args, tfs.SerializationFormat.TORCH_SAVE)
        return original(*args)

    _replace("megatron.core.dist_checkpointing.strategies.filesystem_async", "_write_item", _write_item)


def _peft_resume_metadata_load() -> None:
    """Resuming a LoRA run: "ValueError: Unexpected top-level object type: <class 'NoneType'>".
    nemo's PEFT checkpoint IO first reads only the adapter checkpoint's metadata with
    ``dist_checkpointing.load(sharded_state_dict=None, ...)``, which megatron-core 0.10.0's load()
    does not accept; the common (non-tensor) state dict is what the caller wants. A version fix,
    not a CPU one."""
    from megatron.core import dist_checkpointing

    original = dist_checkpointing.load

    def load(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        if sharded_state_dict is None:
            return dist_checkpointing.load_common_state_dict(checkpoint_dir)
        return original(sharded_state_dict, checkpoint_dir, *args, **kwargs)

    # nemo.lightning.io.pl calls it through the package attribute.
    _replace("megatron.core.dist_checkpointing", "load", load)


def _resume_keeps_epoch_length() -> None:
    """Resuming mid-run replays data: after a resume from step k, Lightning restores "k batches of
    this epoch done" and stops the epoch k batches early, because the batch sampler's len() counts
    only the batches left after ``consumed_samples``; the next epoch restarts at the resume point and
    repeats batches (NVIDIA/NeMo issue 11481, Lightning 2.4 + NeMo 2.1's FineTuningDataModule).
    len() becomes the epoch's full length, consumed batches included, as Lightning assumes."""
    def __len__(self) -> int:
        if self.drop_last:
            return self.total_samples // self.global_batch_size
        return (self.total_samples + self.global_batch_size - 1) // self.global_batch_size

    _replace("nemo.collections.nlp.data.language_modeling.megatron.megatron_batch_samplers",
             "BaseMegatronBatchSampler.__len__", __len__)


def _serial_index_build() -> None:
    # GPTSFTDataset's JSONLMemMapDataset builds its .idx files with a forked mp.Pool inside
    # trainer.fit; the worker inherits Lightning's SIGTERM handler, so Pool.terminate() may not stop
    # it and the run can hang after "[rank: 0] Received SIGTERM: 15" (a race: seen in the CPU probe,
    # not in every run). Build them serially in-process; a version fix, not a CPU one.
    from functools import partial

    from nemo.collections.nlp.data.language_modeling import text_memmap_dataset as tmd

    def build_index_files(dataset_paths, newline_int, workers=None, build_index_fn=tmd._build_index_from_memdata,
                          index_mapping_dir=None):
        if len(dataset_paths) < 1:
            raise ValueError("files_list must contain at leat one file name")
        build = partial(tmd._build_memmap_index_files, newline_int, build_index_fn,
                        index_mapping_dir=index_mapping_dir)
        for p in dataset_paths:
            build(p)

    _replace("nemo.collections.nlp.data.language_modeling.text_memmap_dataset", "build_index_files",
             build_index_files)


def _no_cuda_device_fix_on_load() -> None:
    # Every dist-checkpoint load (resume, restore from the import, export) ends in
    # nemo.lightning.io.pl._fix_tensors_device: "AssertionError: (False, False)"
    # (assert torch.cuda.is_initialized()). On a CPU there is no device to move tensors to.
    _replace("nemo.lightning.io.pl", "_fix_tensors_device", lambda ckpt: ckpt)


# Transformer-Engine layer names in the 2.1.0 HF converters -> the local (non-TE) spec's names.
TE_TO_LOCAL = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def _converters_map_local_norm_names() -> None:
    """The HF<->NeMo converters map RMSNorm weights to TE-fused names
    ('decoder.layers.*.self_attention.linear_qkv.layer_norm_weight'). Without TE the model uses the
    local spec ('input_layernorm.weight', 'pre_mlp_layernorm.weight'): llm.import_ckpt then SILENTLY
    leaves every layer norm at 1.0, and export fails with "IndexError: index 0 is out of bounds for
    axis 0 with size 0". The mapping is rewritten for a side that has no TE names."""
    from nemo.lightning import io

    original = io.apply_transforms

    def has_te_names(module) -> bool:
        return any(k.endswith("layer_norm_weight") for k in module.state_dict().keys())

    def apply_transforms(source, target, mapping, transforms=[], **kw):  # noqa: B006 (upstream signature)
        src_local, tgt_local = not has_te_names(source), not has_te_names(target)
        new = {}
        for k, v in mapping.items():
            for te, local in TE_TO_LOCAL.items():
                if src_local:
                    k = k.replace(te, local)
                if tgt_local:
                    v = v.replace(te, local)
            new[k] = v
        return original(source, target, mapping=new, transforms=transforms, **kw)

    # The importers/exporters call io.apply_transforms through the package attribute at run time.
    _replace("nemo.lightning.io", "apply_transforms", apply_transforms)


# Version fixes for this pip set (torch 2.13 + megatron-core 0.10.0 + nemo 2.1.0), needed on a GPU
# with the same versions too: apply_compat() applies them anywhere, apply() includes them.
COMPAT_PATCHES: dict[str, Callable[[], None]] = {
    "dist_ckpt_write_item_compat": _dist_ckpt_write_item_compat,
    "peft_resume_metadata_load": _peft_resume_metadata_load,
    "resume_keeps_epoch_length": _resume_keeps_epoch_length,
    "serial_index_build": _serial_index_build,
}

# CPU-only patches, in the order apply() runs them (after COMPAT_PATCHES).
PATCHES: dict[str, Callable[[], None]] = {
    "cuda_device_to_cpu": _cuda_device_to_cpu,
    "cuda_calls_to_cpu": _cuda_calls_to_cpu,
    "rng_tracker_without_cuda": _rng_tracker_without_cuda,
    "clip_grads_without_cuda_assert": _clip_grads_without_cuda_assert,
    "fusions_off": _fusions_off,
    "no_cuda_device_fix_on_load": _no_cuda_device_fix_on_load,
    "converters_map_local_norm_names": _converters_map_local_norm_names,
}


def applied() -> list[str]:
    """Names of the patches applied in this process."""
    return list(_applied)


def run_patches(patches: dict[str, Callable[[], None]], exclude, done: list[str]) -> None:
    """Run each patch of ``patches`` (in order) that is neither in ``exclude`` nor in ``done``, adding its
    name to ``done`` (a shim's list of applied patches; recipes.bridge_shim's too)."""
    for name, patch in patches.items():
        if name in exclude or name in done:
            continue
        patch()
        done.append(name)


def _run(patches: dict[str, Callable[[], None]], exclude) -> None:
    run_patches(patches, exclude, _applied)


def _check_names(exclude) -> None:
    unknown = sorted(set(exclude) - set(COMPAT_PATCHES) - set(PATCHES))
    if unknown:
        raise ValueError(f"unknown patch name(s) {unknown}; known: {sorted([*COMPAT_PATCHES, *PATCHES])}")


def apply_compat(exclude: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Apply the version fixes (:data:`COMPAT_PATCHES`) once per process, on CPU or GPU."""
    _check_names(exclude)
    _run(COMPAT_PATCHES, exclude)
    return applied()


def apply(exclude: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Apply the version fixes and every CPU patch not in ``exclude`` (each once per process); return
    the names applied so far.

    Raises RuntimeError when CUDA is available: the CPU patches would break a GPU run.
    ``exclude`` exists for tests that demonstrate what a patch prevents.
    """
    import torch

    if torch.cuda.is_available():
        raise RuntimeError("recipes.cpu_shim.apply(): CUDA is available; the CPU patches must not be applied "
                           "on a GPU machine (they redirect every cuda device to cpu)")
    _check_names(exclude)
    _run(COMPAT_PATCHES, exclude)
    _run(PATCHES, exclude)
    return applied()


# ---------------------------------------------------------------------------------------------
# process set-up for NeMo (converters and training backends alike)


def is_cpu() -> bool:
    import torch
    return not torch.cuda.is_available()


def set_rendezvous_default(environ) -> None:
    """MASTER_ADDR=127.0.0.1 (single-node torch.distributed rendezvous) unless given, or unless this is a Slurm
    task (SLURM_NTASKS set): there Lightning's SLURMEnvironment takes the job's first node from SLURM_NODELIST,
    and 127.0.0.1 would give every node of a multi-node job a rendezvous of its own."""
    if "SLURM_NTASKS" not in environ:
        environ.setdefault("MASTER_ADDR", "127.0.0.1")


def prepare_process(cpu: Optional[bool] = None, exclude_patches: tuple[str, ...] = ()) -> bool:
    """Environment for NeMo in this process; applies the CPU shim when there is no CUDA (all patches but
    ``exclude_patches``, which only tests use). Returns cpu."""
    cpu = is_cpu() if cpu is None else cpu
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_rendezvous_default(os.environ)
    # torch >= 2.6 loads with weights_only=True; NeMo 2.1 checkpoints (common.pt) pickle pathlib
    # paths, so resuming fails with "Unsupported global: GLOBAL pathlib.PosixPath" without this.
    import pathlib

    import torch
    torch.serialization.add_safe_globals([pathlib.PosixPath, pathlib.Path])
    if cpu:
        apply(exclude=exclude_patches)
    else:
        apply_compat(exclude=exclude_patches)
    return cpu

