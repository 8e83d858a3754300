"""Index arithmetic past 2^31 in the Triton kernels (a row index times a row stride, ImageNet-64 scale).

Triton multiplies i32 by i32 in i32: ``offs_n * stride_x`` with 1.28M rows × 12,288 values wraps and reads the
wrong memory. The kernels route every row offset through ``kernels.global_retrieval._wide`` (int64). These tests
run the kernels under the CPU interpreter on a key view whose last rows lie past 2^31 elements without
allocating them: a strided view (row stride 2^26 bytes) into a large *virtual* buffer of which only the rows'
own pages are ever touched (Linux maps untouched pages lazily; the resident memory stays a few MB). The view
starts in the middle of a 2^32-byte region, so a wrapped (negative) offset lands in mapped, zero-filled memory
and shows as a wrong answer rather than a crash. Compared against the same kernel on a contiguous copy of the
same rows (bitwise: same arithmetic, only the addresses differ) and the float64 oracle.
"""

import os
import re
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")
from analytic_diffusion.ops import triton_backend as T

if not T.interpreting():
    pytest.skip("the virtual-buffer trick needs the CPU interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
if not sys.platform.startswith("linux"):
    pytest.skip("relies on Linux's lazily mapped anonymous memory", allow_module_level=True)

from analytic_diffusion.kernels import global_retrieval as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_STRIDE = 1 << 26  # bytes (uint8 keys): row 32 starts at 2^31
N_ROWS, D = 40, 24


@pytest.fixture(scope="module")
def far_keys():
    """(strided view whose rows 32..39 start past 2^31 elements, contiguous copy of the same rows)."""
    half = 1 << 31
    try:
        buf = torch.empty(2 * half + N_ROWS * ROW_STRIDE, dtype=torch.uint8)  # virtual: never touched as a whole
    except RuntimeError as exc:  # pragma: no cover - depends on the machine's overcommit policy
        pytest.skip(f"cannot reserve 6.8 GB of virtual memory here ({exc})")
    gen = torch.Generator().manual_seed(11)
    view = buf.as_strided((N_ROWS, D), (ROW_STRIDE, 1), storage_offset=half)
    view.copy_(torch.randint(0, 256, (N_ROWS, D), generator=gen, dtype=torch.uint8))
    assert (N_ROWS - 1) * ROW_STRIDE >= 1 << 31
    return view, view.contiguous()


def _queries(keys, b, sigma, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = keys[N_ROWS - 1 - torch.arange(b) % 8].float() * (2 / 255) - 1  # near the far rows (past 2^31)
    return (rows + sigma * torch.randn(b, D, generator=gen)).contiguous()


def _oracle_mean(q, keys, coef):
    y = keys.double() * (2 / 255) - 1
    logits = -coef.double()[:, None] * torch.cdist(q.double(), y) ** 2
    return torch.softmax(logits, 1) @ y


def _split_n_mean(q, keys, coef):
    m, l, _l2, o, tk = G.split_n(q, keys, coef * 1.4426950408889634, scale=2 / 255, shift=-1.0, splits=2, topk=4)
    w = torch.exp2(m - m.max(0).values)
    mean = (w[:, :, None] * o).sum(0) / (w * l).sum(0)[:, None]
    return mean, tk


def test_split_n_reads_rows_past_2_31(far_keys):
    view, dense = far_keys
    q = _queries(dense, 5, 0.3, 1)
    coef = torch.full((5,), 1 / (2 * 0.3**2))
    got, got_tk = _split_n_mean(q, view, coef)
    want, want_tk = _split_n_mean(q, dense, coef)
    assert torch.equal(got, want) and torch.equal(got_tk, want_tk)
    assert (got.double() - _oracle_mean(q, dense, coef)).abs().max() < 1e-4


def test_two_pass_reads_rows_past_2_31(far_keys):
    view, dense = far_keys
    b = 3
    gen = torch.Generator().manual_seed(2)
    q = dense[N_ROWS - 1 - torch.arange(b)].float() + 30 * torch.randn(b, D, generator=gen)  # raw key units
    c = 1.4426950408889634 / (2 * 40.0**2)  # base 2, σ = 40 raw units: weights spread over several rows
    a2 = torch.full((b,), 2 * c)
    k2 = torch.full((b,), c)
    norms = (dense.float() ** 2).sum(1)
    got = G.two_pass(q, None, view, a2, k2, norms, precision="ieee", splits=2)
    want = G.two_pass(q, None, dense, a2, k2, norms, precision="ieee", splits=2)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    far = got[3].sum(0)[:, :].double() / got[1][:, None].double()  # the mean in raw units
    y = dense.double()
    z = 2 * c * q.double() @ y.t() - c * (y * y).sum(1)[None, :]
    assert (far - torch.softmax(z * 0.6931471805599453, 1) @ y).abs().max() < 1e-3


def test_every_kernel_offset_is_widened():
    """No kernel multiplies a per-program index by a stride or a row width outside ``_wide`` / an int64 cast."""
    bad = []
    for name in ("global_retrieval.py", "patch_retrieval.py", "coordinate_retrieval.py"):
        with open(os.path.join(ROOT, "kernels", name)) as f:
            for i, line in enumerate(f, 1):
                code = line.split("#")[0]
                if re.search(r"\boffs_\w+(\[[^\]]*\])?\s*\*\s*stride", code) or re.search(
                    r"\bpid_\w+\s*\*\s*stride", code
                ):
                    bad.append(f"{name}:{i}: {line.strip()}")
    assert not bad, "32-bit row offsets:\n" + "\n".join(bad)
