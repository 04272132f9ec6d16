import itertools

import pytest
import torch

from hf_semisparse.masks import (
    check_nm_sparse,
    compute_nm_mask,
    compute_partial_nm_mask,
    find_nm_violation,
    is_nm_sparse,
    pack_mask,
    unpack_mask,
)


def brute_force_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Reference: for each group, the subset of n indices with the largest |w| sum; ties -> lexicographically
    smallest index set among those whose sorted magnitudes are largest element by element."""
    w = weight.double().abs().reshape(-1, m)
    out = torch.zeros_like(w, dtype=torch.bool)
    for g, row in enumerate(w.tolist()):
        best = None
        for subset in itertools.combinations(range(m), n):
            # rank candidates: biggest kept values first, then lower indices
            key = (sorted((row[i] for i in subset), reverse=True), [-i for i in subset])
            if best is None or key > best[0]:
                best = (key, subset)
        out[g, list(best[1])] = True
    return out.reshape(weight.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_mask_matches_brute_force(dtype, n, m):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(16, 4 * m, generator=g).to(dtype)
        assert torch.equal(compute_nm_mask(w, n, m), brute_force_mask(w, n, m))


def test_ties_are_broken_towards_lower_index():
    # quantized values force many ties; bf16 rounding creates more
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-2, 3, (64, 32), generator=g).float()
    assert torch.equal(compute_nm_mask(w), brute_force_mask(w, 2, 4))
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    assert compute_nm_mask(w).tolist() == [[True, True, False, False]]
    assert compute_nm_mask(torch.zeros(1, 4)).tolist() == [[True, True, False, False]]


def test_mask_keeps_exactly_n_per_group_and_is_deterministic():
    w = torch.randn(33, 64, dtype=torch.float16)
    mask = compute_nm_mask(w)
    assert (mask.reshape(-1, 4).sum(1) == 2).all()
    assert torch.equal(mask, compute_nm_mask(w.clone()))
    assert is_nm_sparse(w * mask)


def test_bad_shapes_and_values_raise():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        compute_nm_mask(torch.randn(4, 6))
    with pytest.raises(ValueError, match="NaN"):
        compute_nm_mask(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]))


def test_find_violation_reports_first_bad_group():
    w = torch.randn(8, 16)
    w = w * compute_nm_mask(w)
    assert find_nm_violation(w) is None
    w[3, 8:12] = torch.tensor([1.0, 5.0, 5.0, 0.0])  # row 3, columns 8..11: three non-zeros
    w[6, 0:4] = 1.0
    bad = find_nm_violation(w)
    assert bad.index == (3, 8)
    assert bad.nonzeros == 3
    with pytest.raises(ValueError, match=r"weight.*\(3, 8\)"):
        check_nm_sparse(w, "layer.weight")


def test_partial_mask_levels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    groups = w.numel() // 4
    assert compute_partial_nm_mask(w, 0.0).all()
    assert torch.equal(compute_partial_nm_mask(w, 1.0), compute_nm_mask(w))
    previous = torch.ones_like(w, dtype=torch.bool)
    for level in (0.1, 0.35, 0.5, 0.8, 1.0):
        mask = compute_partial_nm_mask(w * previous, level)
        pruned_groups = int((mask.reshape(-1, 4).sum(1) == 2).sum())
        assert pruned_groups == int(level * groups)
        # raising the level on the pruned weights never revives a pruned weight
        assert not (mask & ~previous).any()
        previous = mask
    with pytest.raises(ValueError):
        compute_partial_nm_mask(w, 1.5)


def test_partial_mask_prunes_cheapest_groups_first():
    w = torch.tensor([[10.0, 9.0, 8.0, 7.0, 1.0, 1.0, 0.1, 0.1]])
    mask = compute_partial_nm_mask(w, 0.5)
    assert mask.tolist() == [[True, True, True, True, True, True, False, False]]


@pytest.mark.parametrize("shape", [(5, 16), (3, 12), (2, 3, 8), (1, 4)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == -(-shape[-1] // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_pack_is_little_endian_like_numpy():
    np = pytest.importorskip("numpy")
    mask = torch.rand(7, 24) > 0.5
    expected = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert (pack_mask(mask).numpy() == expected).all()


def test_unpack_rejects_wrong_shape():
    with pytest.raises(ValueError, match="expected"):
        unpack_mask(torch.zeros(4, 2, dtype=torch.uint8), (4, 24))
    with pytest.raises(TypeError):
        pack_mask(torch.ones(2, 8))
