"""Megatron-Bridge 0.3 + megatron-core 0.16 (and 0.6 + 0.19) without CUDA: the import stubs and the patches.

The bridge backend (``recipes.bridge_backend``) runs in its own environment (``.venv-bridge``: the
versions of NVIDIA's NeMo 26.02 container, see ``requirements/bridge.txt``; ``.venv-bridge06``: Megatron-Bridge
0.6.2, whose venv has torch's CUDA build, run here on the CPU; the same stubs and patches serve both). NVIDIA
supports these libraries on GPUs only; on this project's CPU machines a fine-tune runs once

* :func:`import_bridge` has imported ``megatron.bridge`` with import-time stubs for what is not installed, scoped
  to that import: ``transformer_engine`` (``megatron.bridge.peft.lora`` imports it unguarded — "ModuleNotFoundError:
  No module named 'transformer_engine'"), ``triton`` (megatron-core's mamba inference kernels, pulled
  in by ``megatron.bridge.models``; 0.6's venv has the real one) and, for 0.6's training loop,
  ``nvidia_resiliency_ext`` (see :func:`_stub_modules`). The stubs are removed again afterwards so megatron-core's own
  ``HAVE_TE`` checks still see no Transformer Engine; the bridge's PEFT modules compute ``HAVE_TE=True``
  from megatron-core's Transformer-Engine extension (which imports without TE and binds MagicMocks), so
  their flags are forced off ("TypeError: isinstance() arg 2 must be a type" otherwise);
* :func:`apply` has replaced the symbols of :data:`PATCH_TARGETS`, one small function per patch below,
  each naming the error it avoids. They change process-wide behaviour, so :func:`apply` refuses to run
  with CUDA: on a GPU nothing here is applied.

Settings that are not patches (gloo, fp32, the local layer spec, fused kernels off, no distributed
optimizer, synchronous checkpoints) are chosen by ``recipes.bridge_recipe`` from its ``cpu`` flag.
Measured with the probes of shared/reference/bridge-probe (each patch was found by ablation there).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import os
import sys
import types
from typing import Any, Callable

from recipes import cpu_shim
from recipes.cpu_shim import replace_listed, resolve  # noqa: F401 - resolve: also this module's public name

# Every (module, attribute path) a patch replaces; tests/test_bridge.py checks that each exists in the
# pinned versions, so an upgrade that renames one fails loudly instead of silently running unpatched.
PATCH_TARGETS: tuple[tuple[str, str], ...] = (
    ("torch.cuda", "current_device"),
    ("torch.cuda", "set_device"),
    ("torch.cuda", "synchronize"),
    ("torch.cuda", "Stream"),
    ("torch.cuda", "Event"),
    ("torch.cuda", "current_stream"),
    ("torch.cuda", "stream"),
    ("torch", "Tensor.cuda"),
    ("torch.nn", "Module.cuda"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("torch.cuda", "get_rng_state"),
    ("torch.cuda", "manual_seed"),
    ("megatron.bridge.training.setup", "initialize_megatron"),
    ("megatron.bridge.training.initialize", "_set_random_seed"),
    ("megatron.bridge.training.initialize", "compile_helpers"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
)

ORIGINALS: dict[tuple[str, str], Any] = {}
_applied: list[str] = []
_mode = None  # the TorchFunctionMode entered by _cuda_tensors_to_cpu


def _replace(module: str, attr_path: str, new: Any) -> None:
    replace_listed(PATCH_TARGETS, ORIGINALS, module, attr_path, new)


# ---------------------------------------------------------------------------------------------
# import-time stubs


class _Never:
    """A class nothing is an instance of (the stubbed Transformer-Engine layer classes)."""

    def __init__(self, *a, **k):
        raise RuntimeError("transformer_engine is not installed: this stub only lets megatron.bridge import")


def _stub_modules() -> dict[str, types.ModuleType]:
    te = types.ModuleType("transformer_engine")
    te.__version__ = "0.0"  # older than any real one: every is_te_min_version() check is False
    pt = types.ModuleType("transformer_engine.pytorch")
    for n in ("Linear", "LayerNormLinear", "TransformerLayer", "LayerNorm", "RMSNorm", "GroupedLinear",
              "LayerNormMLP", "DotProductAttention"):
        setattr(pt, n, type(n, (_Never,), {}))
    ops = types.ModuleType("transformer_engine.pytorch.ops")
    for n in ("Sequential", "Linear", "LayerNorm", "RMSNorm", "Quantize", "MakeExtraOutput", "Dropout",
              "ConstantScale", "AddExtraInput"):
        setattr(ops, n, type(n, (_Never,), {}))
    pt.ops, pt.fp8_autocast, te.pytorch = ops, contextlib.nullcontext, pt

    tr = types.ModuleType("triton")  # kernels are decorated at import, never launched on a CPU
    tl = types.ModuleType("triton.language")

    def deco(*a, **k):
        return a[0] if len(a) == 1 and callable(a[0]) and not k else (lambda f: f)

    class constexpr:  # noqa: N801 - used as an annotation by the kernels
        pass

    tr.jit = tr.autotune = tr.heuristics = deco
    tr.Config = lambda *a, **k: None
    tr.cdiv = lambda a, b: (a + b - 1) // b
    tr.next_power_of_2 = lambda n: 1 << (int(n) - 1).bit_length()
    tl.constexpr = constexpr
    tl.__getattr__ = lambda name: (_ for _ in ()).throw(AttributeError(name)) if name.startswith("__") else constexpr
    tr.language = tl
    # Megatron-Bridge 0.6's training loop (training/pretrain.py) imports nvidia_resiliency_ext.inprocess
    # unguarded, for a type; megatron-core 0.19 refuses nvidia-resiliency-ext older than 0.6.0 once it is
    # installed, and 0.5+ has wheels for glibc 2.39 only ("No module named 'nvidia_resiliency_ext'" otherwise)
    nvrx = types.ModuleType("nvidia_resiliency_ext")
    nvrx.__version__ = "0.0.0"  # megatron-core's is_nvrx_min_version(): never new enough
    inproc = types.ModuleType("nvidia_resiliency_ext.inprocess")
    inproc.CallWrapper = type("CallWrapper", (_Never,), {})
    nvrx.inprocess = inproc
    mods = {"transformer_engine": te, "transformer_engine.pytorch": pt, "transformer_engine.pytorch.ops": ops,
            "triton": tr, "triton.language": tl, "nvidia_resiliency_ext": nvrx,
            "nvidia_resiliency_ext.inprocess": inproc}
    for name, m in mods.items():
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return mods


@contextlib.contextmanager
def _scoped(stubs: dict[str, types.ModuleType]):
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# megatron-core modules that megatron.bridge pulls in: imported first without the Transformer-Engine
# stub (only triton, where one needs it), so their import-time HAVE_TE flags stay False.
_CORE_FIRST = ("megatron.core", "megatron.core.transformer", "megatron.core.models.gpt", "megatron.core.optimizer",
               "megatron.core.tensor_parallel", "megatron.core.distributed",
               "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.models.mamba.mamba_layer_specs",
               "megatron.core.post_training.modelopt.layers", "megatron.core.models.multimodal.llava_model")


@contextlib.contextmanager
def _te_version_cache_cleared():
    """The stub says its version is "0.0" (class bodies such as the DeepSeek provider's call
    ``is_te_min_version`` at import: "PackageNotFoundError: No package metadata was found for
    transformer-engine" without one); megatron-core caches what it read, so the cache is cleared afterwards."""
    try:
        yield
    finally:
        import megatron.core.utils as mu
        mu._te_version = None


def import_bridge():
    """Import ``megatron.bridge`` (and its PEFT modules) on a machine without Transformer Engine/triton.

    Real modules win: a stub is only inserted for a package that is not installed (a GPU image with TE
    imports everything as it is). Returns the ``megatron.bridge`` module."""
    if "megatron.bridge.peft.lora" in sys.modules:
        return sys.modules["megatron.bridge"]
    import torch._dynamo  # noqa: F401 - torch's own compile stack must never see the triton stub
    import torch._inductor.compile_fx  # noqa: F401
    stubs = {k: v for k, v in _stub_modules().items() if not _have(k.split(".")[0])}
    triton_only = {k: v for k, v in stubs.items() if k.startswith("triton")}
    for m in _CORE_FIRST:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != "triton":
                raise
            with _scoped(triton_only):
                importlib.import_module(m)
    before = set(sys.modules)
    with _scoped(stubs), _te_version_cache_cleared():
        importlib.import_module("megatron.bridge")
        importlib.import_module("megatron.bridge.peft.lora")
        importlib.import_module("megatron.bridge.peft.lora_layers")
        if "nvidia_resiliency_ext" in stubs:
            importlib.import_module("megatron.bridge.training.pretrain")  # 0.6: see _stub_modules
    if "transformer_engine" in stubs:
        # Modules imported under the stub that probe with ``try: import transformer_engine`` (the bridge's
        # model providers, comm_overlap, peft.utils/module_matcher via megatron-core's TE extension, which
        # binds MagicMocks) think TE is there: turn their flags off, so no TE code path is taken at run time
        # ("TypeError: isinstance() arg 2 must be a type" in the LoRA module matcher otherwise).
        for name in sorted(set(sys.modules) - before) + ["megatron.bridge.peft.utils",
                                                          "megatron.bridge.peft.module_matcher"]:
            mod = sys.modules.get(name)
            if mod is not None and name.startswith("megatron."):
                for k in [k for k, v in vars(mod).items() if k.startswith("HAVE_TE") and v is True]:
                    setattr(mod, k, False)
    return sys.modules["megatron.bridge"]


# ---------------------------------------------------------------------------------------------
# the patches


def _cuda_device_queries() -> None:
    import torch
    # "RuntimeError: Torch not compiled with CUDA enabled" (parallel_state, model providers, timers)
    _replace("torch.cuda", "current_device", lambda: 0)
    _replace("torch.cuda", "set_device", lambda *a, **k: None)
    _replace("torch.cuda", "synchronize", lambda *a, **k: None)
    del torch


class _Event:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _Event()

    def synchronize(self):
        pass

    def query(self):
        return True


def _cuda_streams() -> None:
    # "RuntimeError: torch.cuda.Stream requires CUDA support" (the model provider's DDP wrap)
    _replace("torch.cuda", "Stream", _Stream)
    _replace("torch.cuda", "Event", _Event)
    _replace("torch.cuda", "current_stream", lambda *a, **k: _Stream())
    _replace("torch.cuda", "stream", lambda *a, **k: contextlib.nullcontext())


def _dot_cuda_is_identity() -> None:
    # "AssertionError: Torch not compiled with CUDA enabled" (get_model: model_module.cuda(...))
    _replace("torch", "Tensor.cuda", lambda self, *a, **k: self)
    _replace("torch.nn", "Module.cuda", lambda self, *a, **k: self)


def _rng_tracker_on_cpu() -> None:
    import torch
    # "RuntimeError" in CudaRNGStatesTracker.add/fork (model_parallel_cuda_manual_seed): the tracker keeps
    # and swaps the CPU generator's state instead of a CUDA one
    _replace("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _replace("megatron.core.tensor_parallel.random", "_set_cuda_rng_state",
             lambda state, *a, **k: torch.set_rng_state(state))
    _replace("torch.cuda", "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _replace("torch.cuda", "manual_seed", lambda seed: None)


def _cuda_tensors_to_cpu() -> None:
    # device='cuda' (or a device index) on tensor factories and .to(): "RuntimeError: Torch not compiled with
    # CUDA enabled" (training.setup's start-time all-reduce, loss buffers, the grad-norm); NeMo's shim's mode
    global _mode
    if _mode is None:
        _mode = cpu_shim.cuda_to_cpu_mode()
        _mode.__enter__()


def _initialize_without_cuda() -> None:
    import megatron.bridge.training.initialize as init
    # "AssertionError: Megatron requires CUDA." (training/initialize.py)
    _replace("megatron.bridge.training.setup", "initialize_megatron",
             functools.partial(init.initialize_megatron, allow_no_cuda=True))


def _seed_the_rng_tracker() -> None:
    import megatron.bridge.training.initialize as init
    from megatron.core import tensor_parallel
    original = ORIGINALS.get(("megatron.bridge.training.initialize", "_set_random_seed"), init._set_random_seed)

    def set_random_seed(seed, *a, **k):
        original(seed, *a, **k)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)  # skipped there when device_count() == 0

    # "Exception: cuda rng state model-parallel-rng is not added"
    _replace("megatron.bridge.training.initialize", "_set_random_seed", set_random_seed)


def _no_helper_compile() -> None:
    # "make: *** No targets specified and no makefile found" -> "Failed to compile the C++ dataset helper
    # functions", sys.exit(1): the megatron-core wheel ships the built helpers but no Makefile
    _replace("megatron.bridge.training.initialize", "compile_helpers", lambda: None)


def _clip_grads_on_cpu() -> None:
    # "AssertionError: param.grad.type() == 'torch.cuda.FloatTensor'" (clip_grads.py): the same scaling
    # without the multi-tensor CUDA kernel (NeMo's shim's function, which takes 0.16's use_decoupled_grad)
    cpu_shim.replace_clip_grads(_replace)


PATCHES: dict[str, Callable[[], None]] = {
    "cuda_device_queries": _cuda_device_queries,
    "cuda_streams": _cuda_streams,
    "dot_cuda_is_identity": _dot_cuda_is_identity,
    "rng_tracker_on_cpu": _rng_tracker_on_cpu,
    "cuda_tensors_to_cpu": _cuda_tensors_to_cpu,
    "initialize_without_cuda": _initialize_without_cuda,
    "seed_the_rng_tracker": _seed_the_rng_tracker,
    "no_helper_compile": _no_helper_compile,
    "clip_grads_on_cpu": _clip_grads_on_cpu,
}


def applied() -> list[str]:
    return list(_applied)


def apply(exclude: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Import the bridge (:func:`import_bridge`) and apply every patch not in ``exclude`` (once each).
    Refuses to run where CUDA is available: there the libraries run as NVIDIA ships them."""
    import torch
    unknown = sorted(set(exclude) - set(PATCHES))
    if unknown:
        raise ValueError(f"unknown bridge patch(es) {unknown}; known: {sorted(PATCHES)}")
    if torch.cuda.is_available():
        raise RuntimeError("recipes.bridge_shim.apply() is for CPU-only machines; CUDA is available here")
    import_bridge()
    cpu_shim.run_patches(PATCHES, exclude, _applied)
    return applied()


def is_cpu() -> bool:
    import torch
    return not torch.cuda.is_available()


def prepare_process(exclude_patches: tuple[str, ...] = ()) -> bool:
    """What every bridge process does first: no model hub, the bridge imported, the CPU patches where there is
    no CUDA. Returns True on a CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if not is_cpu():
        import_bridge()
        return False
    apply(exclude_patches)
    return True
