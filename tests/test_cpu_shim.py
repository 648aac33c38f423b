"""recipes.cpu_shim: every patched symbol exists in the pinned versions, apply() patches each one,
is idempotent, refuses to run with CUDA, and the patched behaviour is what NeMo needs on a CPU.

The patches change process-wide torch/megatron state, so they are applied in a fresh subprocess
(one, shared by the tests below), never in the pytest process.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipes import cpu_shim

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: nothing is patched yet when the targets are resolved.
PROBE = textwrap.dedent("""
    import json, sys
    import torch
    from recipes import cpu_shim

    out = {"missing": [], "already_patched": [], "not_replaced": [], "original_not_kept": []}
    before = {}
    for module, attr in cpu_shim.PATCH_TARGETS:
        try:
            before[(module, attr)] = cpu_shim.resolve(module, attr)[2]
        except (ImportError, AttributeError) as e:
            out["missing"].append(f"{module}.{attr}: {type(e).__name__}: {e}")
            continue
        if getattr(before[(module, attr)], "__module__", "") == "recipes.cpu_shim":
            out["already_patched"].append(f"{module}.{attr}")
    depth0 = torch._C._len_torch_function_stack()

    out["applied"] = cpu_shim.apply()
    for key, orig in before.items():
        now = cpu_shim.resolve(*key)[2]
        if key not in cpu_shim.ORIGINALS:
            out["not_replaced"].append(".".join(key))
        elif cpu_shim.ORIGINALS[key] is not orig or now is orig:
            out["original_not_kept"].append(".".join(key))
    depth1 = torch._C._len_torch_function_stack()
    after_first = {k: cpu_shim.resolve(*k)[2] for k in before}

    out["applied_again"] = cpu_shim.apply()
    out["idempotent"] = (all(cpu_shim.resolve(*k)[2] is v for k, v in after_first.items())
                         and torch._C._len_torch_function_stack() == depth1)
    out["mode_entered_once"] = depth1 == depth0 + 1

    # behaviour the patches exist for
    t = torch.zeros(2, device="cuda")
    out["cuda_tensor_device"] = str(t.device)
    out["tensor_cuda_noop"] = str(torch.ones(1).cuda().device)
    out["current_device"] = str(torch.cuda.current_device())
    from megatron.core.transformer.transformer_config import TransformerConfig
    tc = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, apply_rope_fusion=True,
                           masked_softmax_fusion=True, bias_activation_fusion=True)
    out["fusions_after_post_init"] = [tc.apply_rope_fusion, tc.masked_softmax_fusion, tc.bias_activation_fusion]
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.full((4,), 2.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    out["clipped_grad"] = p.grad.tolist()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    tracker = get_cuda_rng_tracker(); tracker.add("probe", 1234)
    with tracker.fork():
        out["rng_fork_ok"] = True
    print("PROBE" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def probe():
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")]
    assert r.returncode == 0 and lines, f"probe failed (rc={r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(lines[-1][len("PROBE"):])


@pytest.mark.slow
def test_every_patch_target_exists_unpatched_in_pinned_versions(probe):
    assert probe["missing"] == [], "a patched symbol is gone from the pinned versions:\n" + "\n".join(probe["missing"])
    assert probe["already_patched"] == []


@pytest.mark.slow
def test_apply_replaces_every_target_and_keeps_the_original(probe):
    assert probe["not_replaced"] == [], f"PATCH_TARGETS lists symbols no patch replaced: {probe['not_replaced']}"
    assert probe["original_not_kept"] == []
    assert set(probe["applied"]) == set(cpu_shim.PATCHES) | set(cpu_shim.COMPAT_PATCHES)


@pytest.mark.slow
def test_apply_is_idempotent(probe):
    assert probe["applied_again"] == probe["applied"]
    assert probe["idempotent"] is True
    assert probe["mode_entered_once"] is True


@pytest.mark.slow
def test_patched_behaviour(probe):
    assert probe["cuda_tensor_device"] == "cpu"
    assert probe["tensor_cuda_noop"] == "cpu"
    assert probe["current_device"] == "cpu"
    assert probe["fusions_after_post_init"] == [False, False, False]
    assert probe["clipped_grad"] == pytest.approx([0.5] * 4, rel=1e-5)  # max_norm / total_norm = 1/4
    assert probe["rng_fork_ok"] is True


def test_apply_refuses_when_cuda_is_available(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = cpu_shim.applied()
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_shim.apply()
    assert cpu_shim.applied() == before


def test_unknown_patch_name_is_rejected_before_patching():
    before = cpu_shim.applied()
    with pytest.raises(ValueError, match="unknown patch name"):
        cpu_shim.apply_compat(exclude=["no_such_patch"])
    assert cpu_shim.applied() == before


def test_patch_targets_are_unique_and_each_patch_is_documented():
    assert len(set(cpu_shim.PATCH_TARGETS)) == len(cpu_shim.PATCH_TARGETS)
    for name, fn in {**cpu_shim.COMPAT_PATCHES, **cpu_shim.PATCHES}.items():
        import inspect
        src = inspect.getsource(fn)
        assert fn.__doc__ or "    # " in src, f"patch {name} has no comment saying which error it avoids"
