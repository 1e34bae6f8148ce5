"""lincomb: the torch reference, the C++ CPU reference and exact float64 math agree."""

import numpy as np
import pytest
import torch

from fastdiff.ops import lincomb, lincomb_

SHAPES = [(1,), (7,), (3, 5, 7), (3, 4, 17, 19)]


def tensors(shape, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


def exact(srcs, coefs):
    return sum(c * s.double() for s, c in zip(srcs, coefs))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("coefs", [(1.5,), (0.9, -0.3), (1.1, -2.0, 0.7, 0.05, -1.3)])
def test_reference_within_twice_the_dtype_rounding_of_torch(shape, dtype, coefs):
    srcs = tensors(shape, len(coefs), dtype)
    want = exact(srcs, coefs)
    got = lincomb(srcs, coefs)
    assert got.dtype == dtype and got.shape == srcs[0].shape
    # error budget: twice what torch's own expression in this dtype makes
    torch_expr = sum(c * s for s, c in zip(srcs, coefs))
    budget = 2 * (torch_expr.double() - want).abs().max().item() + torch.finfo(dtype).eps * want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= budget


def test_in_place_with_dst_among_sources_anywhere():
    srcs = tensors((3, 5, 7), 3, torch.float32)
    want = exact(srcs, (0.5, -1.0, 2.0))
    for position in range(3):
        copies = [s.clone() for s in srcs]
        dst = copies[position]
        lincomb_(dst, copies, (0.5, -1.0, 2.0))
        assert torch.allclose(dst.double(), want, atol=1e-6)


def test_bad_arguments_are_refused():
    a, b = tensors((3, 4), 2, torch.float32)
    with pytest.raises(ValueError, match="matching non-empty srcs and coefs"):
        lincomb([a, b], [1.0])
    with pytest.raises(ValueError, match=r"srcs\[1\] has shape \(3, 5\) but dst has \(3, 4\)"):
        lincomb_(a.clone(), [a, torch.zeros(3, 5)], [1.0, 1.0])
    with pytest.raises(ValueError, match="dst appears twice"):
        lincomb_(a, [a, a], [1.0, 1.0])


def _cpp():
    try:
        from fastdiff import _C
    except ImportError as exc:
        pytest.skip(f"C++ extension fastdiff._C not built: {exc}")
    return _C


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_reference_equals_python_reference(shape, dtype):
    cpp = _cpp()
    coefs = (1.1, -2.0, 0.7, 0.05)
    srcs = tensors(shape, len(coefs), dtype, seed=3)
    want = exact(srcs, coefs)
    ours = lincomb(srcs, coefs)
    dst = np.empty(shape, dtype=np.float32 if dtype == torch.float32 else np.float64)
    cpp.lincomb(dst, [s.numpy() for s in srcs], list(coefs))
    # the C++ reference accumulates in double and rounds once: at most half an ulp from exact
    eps = torch.finfo(dtype).eps
    assert np.max(np.abs(dst - want.numpy())) <= eps * (np.max(np.abs(want.numpy())) + 1)
    assert np.max(np.abs(dst - ours.numpy())) <= 4 * eps * (np.max(np.abs(want.numpy())) + 1)


def test_cpp_lincomb_refuses_mismatched_arrays():
    cpp = _cpp()
    a = np.zeros(5, dtype=np.float32)
    with pytest.raises(ValueError, match="2 srcs but 1 coefs"):
        cpp.lincomb(a, [a, a], [1.0])
    with pytest.raises(ValueError, match="has 4 elements but dst has 5"):
        cpp.lincomb(a, [np.zeros(4, dtype=np.float32)], [1.0])
    with pytest.raises(ValueError, match="float64 but dst has float32"):
        cpp.lincomb(a, [np.zeros(5)], [1.0])
    with pytest.raises(ValueError, match="not supported by the CPU reference"):
        cpp.lincomb(np.zeros(5, dtype=np.int32), [np.zeros(5, dtype=np.int32)], [1.0])
