"""Muon (orthogonalised updates for kernels) + SGD in one optimizer, and CPU memory retention."""
from __future__ import annotations

import copy
import ctypes

import pytest
import torch
import torch.nn as nn

from imclass.train import memory
from imclass.train.optim import MuonSGD, orthogonalize


@pytest.mark.parametrize("shape", [(64, 200), (200, 64)])
def test_orthogonalize_brings_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    g[:, 0] *= 100  # a badly conditioned matrix: one direction dominates
    before = torch.linalg.svdvals(g)
    o = orthogonalize(g, steps=5)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and o.dtype == g.dtype
    assert before.max() / before.min() > 50
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's band, not exactly 1 (by design)
    # the same singular vectors: o is close to U V^T of g
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), o.flatten(), dim=0) > 0.95


def test_orthogonalize_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D matrix"):
        orthogonalize(torch.ones(3, 3, 3))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def _grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def test_sgd_groups_step_exactly_as_torch_sgd():
    a, b = _model(), _model()
    opt_a = MuonSGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, muon=False)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for step in range(3):
        _grads(a, step), _grads(b, step)
        opt_a.step(), opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_muon_group_step_is_the_orthogonalised_nesterov_momentum():
    model = _model()
    kernel = model[0].weight
    opt = MuonSGD([{"params": [kernel]}, {"params": [p for p in model.parameters() if p is not kernel], "muon": False}],
                  lr=0.05, momentum=0.6, nesterov=True, ns_steps=3, normalize=True)
    expected = kernel.detach().clone()
    buf = None
    for step in range(2):
        _grads(model, step)
        g = kernel.grad.clone()
        buf = g.clone() if buf is None else 0.6 * buf + g
        update = orthogonalize((g + 0.6 * buf).reshape(8, -1), 3).view_as(g)
        expected = expected * (8**0.5 / expected.norm()) - 0.05 * update
        opt.step()
        torch.testing.assert_close(kernel, expected)
    assert kernel.norm().item() == pytest.approx(8**0.5, rel=0.1)  # the update is small next to the kept norm


def test_muon_scale_invariance():
    """The orthogonalised update ignores the gradient's scale: a 1000x loss moves a kernel the same."""
    a, b = _model(), copy.deepcopy(_model())
    for model, scale in ((a, 1.0), (b, 1000.0)):
        opt = MuonSGD([model[0].weight], lr=0.02, ns_steps=5)
        _grads(model, 0)
        model[0].weight.grad *= scale
        opt.step()
    torch.testing.assert_close(a[0].weight, b[0].weight, rtol=1e-4, atol=1e-5)


def test_muon_rejects_flat_parameters_and_bad_options():
    model = _model()
    with pytest.raises(ValueError, match=r"kernels/matrices .*\(8,\).*muon=False"):
        MuonSGD(model.parameters())
    with pytest.raises(ValueError, match="momentum"):
        MuonSGD([model[0].weight], momentum=1.0)
    with pytest.raises(ValueError, match="ns_steps"):
        MuonSGD([model[0].weight], ns_steps=0)


def test_muon_state_round_trips_through_state_dict():
    model = _model()
    opt = MuonSGD([{"params": [model[0].weight]}, {"params": list(model[1].parameters()), "muon": False}], lr=0.01)
    _grads(model, 0)
    opt.step()
    clone = MuonSGD([{"params": [model[0].weight]}, {"params": list(model[1].parameters()), "muon": False}], lr=0.01)
    clone.load_state_dict(opt.state_dict())
    torch.testing.assert_close(clone.state[model[0].weight]["momentum_buffer"],
                               opt.state[model[0].weight]["momentum_buffer"])


# ---------------------------------------------------------------------- memory
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mmapped_bytes() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2().hblkhd


@pytest.mark.skipif(not hasattr(ctypes.CDLL("libc.so.6", use_errno=True), "mallinfo2"), reason="glibc >= 2.33")
def test_retain_freed_memory_serves_big_blocks_from_the_heap(monkeypatch):
    monkeypatch.setenv("IMCLASS_RETAIN_MEMORY", "0")
    monkeypatch.setattr(memory, "_active", False)
    assert memory.retain_freed_memory() is False  # opted out
    monkeypatch.delenv("IMCLASS_RETAIN_MEMORY")
    assert memory.retain_freed_memory() is True
    before = _mmapped_bytes()
    big = torch.ones(64 * 2**20 // 4)  # 64 MB: glibc would mmap it by default
    assert _mmapped_bytes() == before  # ... but now it comes from the heap, reused after free
    del big
