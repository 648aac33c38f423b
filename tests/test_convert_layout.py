"""QKV interleave and fc1 split: round trips on GQA shapes, and the interleave order itself."""
import pytest
import torch

from families.layout import merge_fc1, merge_qkv, split_fc1, split_qkv


@pytest.mark.parametrize("n,g,d,h", [(4, 2, 16, 64), (9, 3, 64, 576), (3, 1, 16, 48), (8, 8, 4, 32), (6, 2, 5, 7)])
def test_qkv_round_trip(n, g, d, h):
    q, k, v = torch.randn(n * d, h), torch.randn(g * d, h), torch.randn(g * d, h)
    fused = merge_qkv(q, k, v, n_heads=n, n_groups=g, head_dim=d)
    assert fused.shape == ((n + 2 * g) * d, h)
    q2, k2, v2 = split_qkv(fused, n_heads=n, n_groups=g, head_dim=d)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    # biases (1-D) follow the same rule
    qb, kb, vb = torch.randn(n * d), torch.randn(g * d), torch.randn(g * d)
    assert all(torch.equal(a, b) for a, b in zip(
        split_qkv(merge_qkv(qb, kb, vb, n_heads=n, n_groups=g, head_dim=d), n_heads=n, n_groups=g, head_dim=d),
        (qb, kb, vb)))


def test_qkv_interleave_order_by_hand():
    # 4 heads, 2 groups, head_dim 1: rows label themselves
    q = torch.tensor([[10.], [11.], [12.], [13.]])
    k = torch.tensor([[20.], [21.]])
    v = torch.tensor([[30.], [31.]])
    fused = merge_qkv(q, k, v, n_heads=4, n_groups=2, head_dim=1)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]


def test_shape_errors_name_the_numbers():
    with pytest.raises(ValueError, match="not divisible"):
        split_qkv(torch.zeros(10, 3), n_heads=3, n_groups=2, head_dim=1)
    with pytest.raises(ValueError, match="expected"):
        split_qkv(torch.zeros(10, 3), n_heads=4, n_groups=2, head_dim=1)


def test_fc1_gate_first():
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    fc1 = merge_fc1(gate, up)
    assert torch.equal(fc1[:5], gate)
    g2, u2 = split_fc1(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
