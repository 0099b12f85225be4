"""Every kernel path of every norm with statistic modes, forced one by one on the CPU.

RobustNorm takes batch norm's fused CPU kernels only where they are valid (CPU, float32 or
float64 throughout) and broadcasting ops everywhere else (CUDA, half, bfloat16, mixed
dtypes under autocast). Each path is checked against the reference formula and autograd,
and with ``torch.autograd.gradcheck`` in float64; half and bfloat16 against a float64
reference on the same inputs. Tests marked ``cuda`` run the same checks on a GPU when
one is present.
"""

from __future__ import annotations

import pytest
import torch
from test_norms import SHAPES, _compare, _dims, _randomise_affine, _view, ref_batchnorm, ref_robustnorm
from torch import nn

from trainables.norms import (
    KERNEL_PATHS,
    BatchNorm,
    RobustNorm,
    force_kernel_path,
    fused_path_valid,
    kernel_path,
)

MODES = ("train", "batch", "mixed", "tracked")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rn(shape, mode, dtype=torch.float64, power=0.3):
    """A RobustNorm with trained running statistics, in ``mode`` (train or an eval statistic mode)."""
    layer = _randomise_affine(RobustNorm(shape[1], power=power, momentum=0.3)).to(dtype).train()
    for _ in range(2):
        layer(torch.randn(shape, dtype=dtype) * 2 + 0.5)
    if mode != "train":
        layer.eval().stats_mode = mode
    return layer


def _rn_reference(layer, mode):
    rm, rr = layer.running_mean.detach().double().clone(), layer.running_range.detach().double().clone()
    p, eps = layer.power, layer.eps
    return {
        "train": lambda x, w, b: ref_robustnorm(x, w, b, p, eps),
        "batch": lambda x, w, b: ref_robustnorm(x, w, b, p, eps),
        "mixed": lambda x, w, b: ref_robustnorm(x, w, b, p, eps, mean=rm),
        "tracked": lambda x, w, b: ref_robustnorm(x, w, b, p, eps, mean=rm, rng=rr),
    }[mode]


# ------------------------------------------------------------------ path choice


def test_the_fused_path_is_chosen_only_where_it_is_valid():
    assert fused_path_valid("cpu", [torch.float32]) and fused_path_valid("cpu", [torch.float64, torch.float64])
    assert not fused_path_valid("cuda", [torch.float32])  # CUDA's backward needs saved statistics
    assert not fused_path_valid("mps", [torch.float32])
    for dtype in (torch.float16, torch.bfloat16):
        assert not fused_path_valid("cpu", [dtype])
    assert not fused_path_valid("cpu", [torch.bfloat16, torch.float32])  # autocast: half input, float32 weight
    x = torch.randn(4, 3, 2, 2)
    w = torch.ones(3)
    assert kernel_path(x, w, None) == "fused"
    assert kernel_path(x.bfloat16(), w) == "generic"
    assert kernel_path(x.double(), w) == "generic"
    with force_kernel_path("generic"):
        assert kernel_path(x, w) == "generic"
    with pytest.raises(RuntimeError, match="not valid for torch.bfloat16"), force_kernel_path("fused"):
        kernel_path(x.bfloat16(), w)
    with pytest.raises(ValueError, match="unknown kernel path"), force_kernel_path("cudnn"):
        pass


def test_a_forward_remembers_its_path_for_backward():
    """The path is fixed in forward: a backward run outside the forcing block uses the same one."""
    layer = _rn((8, 3, 4, 4), "train")
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    with force_kernel_path("generic"):
        y = layer(x)
    g = torch.randn_like(y)
    (gx_generic,) = torch.autograd.grad(y, x, g)
    (gx_fused,) = torch.autograd.grad(layer(x), x, g)
    torch.testing.assert_close(gx_generic, gx_fused, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------ float64: formula and gradcheck


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_robustnorm_paths_match_the_formula(path, mode, shape):
    layer = _rn(shape, mode)
    x = torch.randn(shape, dtype=torch.float64) * 3 - 1
    with force_kernel_path(path):
        _compare(layer, x, _rn_reference(layer, mode))


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", [True, False])
def test_robustnorm_paths_pass_gradcheck(path, mode, affine):
    layer = _rn((6, 3, 3, 4), mode)
    if not affine:
        layer.weight, layer.bias = None, None
    x = (torch.randn(6, 3, 3, 4, dtype=torch.float64) * 2).requires_grad_()
    inputs = (x,) if not affine else (x, layer.weight, layer.bias)

    def f(x, *wb):
        if wb:
            layer.weight, layer.bias = wb
        return layer(x)

    running = (layer.running_mean.clone(), layer.running_range.clone())
    with force_kernel_path(path):
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
    if mode == "train":  # gradcheck's many forwards moved the running statistics; that is all they did
        assert not torch.equal(layer.running_mean, running[0])


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_modes_pass_gradcheck(mode):
    layer = _randomise_affine(BatchNorm(3, momentum=0.3)).double().train()
    for _ in range(2):
        layer(torch.randn(6, 3, 3, 4, dtype=torch.float64) * 2 + 0.5)
    if mode != "train":
        layer.eval().stats_mode = mode
    x = (torch.randn(6, 3, 3, 4, dtype=torch.float64) * 2).requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    w, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------ half precision


LOW = {torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative tolerance: ~2 units in the last place, summed


def _low_precision_check(layer64, mode, dtype, device="cpu", autocast_like=False):
    """Outputs and gradients of ``layer64`` cast to ``dtype`` against the float64 reference
    on the same (rounded) inputs. ``autocast_like``: low-precision input, float32 parameters."""
    shape = (16, 4, 5, 5)
    x_low = (torch.randn(shape) * 3 - 1).to(dtype)
    x64 = x_low.double()
    layer = layer64.float() if autocast_like else layer64.to(dtype)
    layer = layer.to(device)
    ref = _rn_reference(layer64, mode) if isinstance(layer64, RobustNorm) else _bn_reference(layer64, mode)
    w64, b64 = layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu()

    x1 = x_low.to(device).requires_grad_()
    y = layer(x1)
    assert y.dtype == dtype, "the output keeps the input's dtype"
    g = torch.randn(shape).to(dtype)
    gx, gw, gb = torch.autograd.grad(y, [x1, layer.weight, layer.bias], g.to(device))
    x2 = x64.clone().requires_grad_()
    w2, b2 = w64.clone().requires_grad_(), b64.clone().requires_grad_()
    y_ref = ref(x2, w2, b2)
    rx, rw, rb = torch.autograd.grad(y_ref, [x2, w2, b2], g.double())
    tol = LOW[dtype]
    scale = lambda t: t.abs().max().item()  # noqa: E731
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=tol, atol=tol * scale(y_ref))
    torch.testing.assert_close(gx.double().cpu(), rx, rtol=tol, atol=tol * scale(rx))
    torch.testing.assert_close(gw.double().cpu(), rw, rtol=tol, atol=tol * scale(rw))
    torch.testing.assert_close(gb.double().cpu(), rb, rtol=tol, atol=tol * scale(rb))
    assert torch.isfinite(layer.running_mean).all()


def _bn_reference(layer, mode):
    rm, rv = layer.running_mean.detach().double().clone(), layer.running_var.detach().double().clone()
    return {
        "train": lambda x, w, b: ref_batchnorm(x, w, b, layer.eps),
        "batch": lambda x, w, b: ref_batchnorm(x, w, b, layer.eps),
        "mixed": lambda x, w, b: ref_batchnorm(x, w, b, layer.eps, mean=rm),
        "tracked": lambda x, w, b: ref_batchnorm(x, w, b, layer.eps, mean=rm, var=rv),
    }[mode]


def _bn(mode):
    layer = _randomise_affine(BatchNorm(4, momentum=0.3)).double().train()
    for _ in range(2):
        layer(torch.randn(16, 4, 5, 5, dtype=torch.float64) * 2 + 0.5)
    if mode != "train":
        layer.eval().stats_mode = mode
    return layer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("autocast_like", [False, True], ids=["all-low", "float32-params"])
def test_robustnorm_half_precision_matches_float64(dtype, mode, autocast_like):
    layer = _rn((16, 4, 5, 5), mode)
    assert kernel_path(torch.zeros(1, 4, dtype=dtype)) == "generic"
    _low_precision_check(layer, mode, dtype, autocast_like=autocast_like)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["batch", "mixed"])
def test_batchnorm_modes_in_half_precision_match_float64(dtype, mode):
    _low_precision_check(_bn(mode), mode, dtype, autocast_like=True)


def test_robustnorm_under_cpu_autocast_trains_a_conv_net():
    """conv (bfloat16 under autocast) -> RobustNorm (float32 parameters): the generic path, finite and close."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), RobustNorm(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)
    )
    x, y = torch.rand(32, 3, 6, 6), torch.randint(0, 4, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    grads_amp = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    for amp, full in zip(grads_amp, (p.grad for p in net.parameters())):
        assert torch.isfinite(amp).all()
        assert torch.nn.functional.cosine_similarity(amp.flatten(), full.flatten(), dim=0) > 0.98


# ------------------------------------------------------------------ CUDA (run when a GPU is present)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_robustnorm_on_cuda_float32_matches_the_cpu_reference(mode):
    layer = _rn((16, 4, 5, 5), mode)
    x = torch.randn(16, 4, 5, 5, dtype=torch.float64) * 3 - 1
    ref = _rn_reference(layer, mode)
    gpu = layer.float().cuda()
    x1 = x.float().cuda().requires_grad_()
    y = gpu(x1)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x1, gpu.weight, gpu.bias], g)  # the first GPU step that used to fail
    x2 = x.clone().requires_grad_()
    w2, b2 = gpu.weight.detach().double().cpu().requires_grad_(), gpu.bias.detach().double().cpu().requires_grad_()
    y_ref = ref(x2, w2, b2)
    refs = torch.autograd.grad(y_ref, [x2, w2, b2], g.double().cpu())
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-4, atol=1e-4)
    for a, r in zip(grads, refs):
        torch.testing.assert_close(a.double().cpu(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_robustnorm_on_cuda_in_half_precision(dtype, mode):
    _low_precision_check(_rn((16, 4, 5, 5), mode), mode, dtype, device="cuda", autocast_like=True)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["batch", "mixed"])
def test_batchnorm_modes_on_cuda(mode):
    _low_precision_check(_bn(mode), mode, torch.float16, device="cuda", autocast_like=True)


def test_reference_helpers_are_the_formula():
    """The references used above, on a hand-checkable input."""
    x = torch.tensor([[0.0], [2.0], [4.0]], dtype=torch.float64)  # one channel: mean 2, range 4
    y = ref_robustnorm(x, torch.ones(1), torch.zeros(1), 1.0, 0.0)
    torch.testing.assert_close(y, torch.tensor([[-0.5], [0.0], [0.5]], dtype=torch.float64))
    assert _dims(torch.zeros(2, 3, 4)) == [0, 2] and _view(torch.ones(3), torch.zeros(2, 3, 4)).shape == (1, 3, 1)
