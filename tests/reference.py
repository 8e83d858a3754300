"""Brute-force float64 references written independently of the package (direct distances, full softmax)."""

import torch


def posterior_bruteforce(x, y, sigma, temperature=1.0, allowed=None):
    """x (B, D), y (N, D) float64 candidate rows, sigma (B,) -> (mean, max weight, 1/Σw²)."""
    x, y = x.double(), y.double()
    d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    logits = -d / (2 * torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2 * temperature)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(logits, 1)
    return w @ y, w.max(1).values, 1.0 / (w * w).sum(1)


def moments_bruteforce(x, y, sigma, temperature=1.0):
    """x (B, D), y (N, D), sigma (B,) -> (mean, per-coordinate variance) in float64, both centred on each row's
    heaviest candidate r: mean = r + Σ w (y − r), var = Σ w (y − r − Σ w (y − r))². Centring on the data (or on
    a mean rounded to |y|·2^-53) would leave u·|y|² of absolute error, all of a narrow posterior's variance."""
    x, y = x.double(), y.double()
    d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    w = torch.softmax(-d / (2 * torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2 * temperature), 1)
    r = y[w.argmax(1)]
    dy = y[None, :, :] - r[:, None, :]
    off = torch.einsum("bn,bnd->bd", w, dy)
    return r + off, torch.einsum("bn,bnd->bd", w, (dy - off[:, None, :]) ** 2)


def knn_bruteforce(x, y, k):
    d = ((x.double()[:, None, :] - y.double()[None]) ** 2).sum(-1)
    order = torch.argsort(d, dim=1, stable=True)[:, :k]
    return torch.gather(d, 1, order), order


def mirror(images):
    """(N, C, H, W) -> mirrored left-right."""
    return images.flip(-1)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def row_rel(a, b):
    """Per-sample relative error ‖a_i − b_i‖ / ‖b_i‖ over the leading dimension."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)


def float32_tolerance(denoise, x, out, base=1e-4, trials=4, eps=2.0**-20):
    """Per-sample tolerance of a float32 result against the float64 one: ``base`` plus 4 × how far the float64
    output ``out`` = denoise(x) moves when x moves by a few float32 ulps (relative ``eps``, random directions).

    A float32 input is only known to its rounding. Where candidates are nearly tied at low σ (Δ‖x − y‖² below
    what float32 resolves puts logits within a few nats, while float32 rounding of the inputs, keys and sums moves
    logits by ~0.1–10 nats at σ ≤ 1e-3) the answer is ill-conditioned at float32 precision: no float32 kernel can
    match float64 better than its own input's rounding does. Well-conditioned samples — nearly all — get ~1e-6
    here, so the check stays at ``base``.
    """
    g = torch.Generator().manual_seed(1234)
    worst = torch.zeros(x.shape[0], dtype=torch.float64)
    for _ in range(trials):
        xi = x * (1 + eps * torch.randn(x.shape, generator=g, dtype=torch.float64))
        worst = torch.maximum(worst, row_rel(denoise(xi), out))
    return base + 4 * worst


def uint8_bank(rng, n, c=1, h=3, w=5, labels=None):
    """A random uint8 KeyBank with the [-1, 1] affine map."""
    from analytic_diffusion.ops import KeyBank

    u = torch.randint(0, 256, (n, c * h * w), generator=rng, dtype=torch.uint8)
    return KeyBank(u, 2 / 255, -1.0, labels=labels, image_shape=(c, h, w))


def noisy_queries(rng, bank, b, sigma):
    """Queries near training rows (the regime samplers visit), plus noise of scale σ."""
    idx = torch.randint(0, bank.n, (b,), generator=rng)
    y = bank.gather(idx, torch.float64)
    return (y + sigma * torch.randn(y.shape, generator=rng, dtype=torch.float64)).float()


def noisy_images(ds, rng, b, sigma):
    """b random stored images of ds with Gaussian noise (σ capped at 2: beyond that only the logits' scale moves),
    as fp32 rows of shape (b, *image_shape)."""
    idx = torch.randint(0, ds.num_stored, (b,), generator=rng)
    x = ds.images_float(idx, torch.float64)
    return (x + min(sigma, 2.0) * torch.randn(x.shape, generator=rng, dtype=torch.float64)).float()


# The patch kernels' contract (kernels/patch_retrieval.py, csrc/cuda/patch_retrieval.cuh, csrc/cpu/patch.h): rule,
# C, H, W, k, R query rows, n training images. Several candidate tiles per split and a partial last tile; R not a
# multiple of any query block; a 3×32×32 whole-crop patch (the largest PSPC crop of CIFAR-10 shapes).
PATCH_CONTRACT_CASES = [
    ("shared", 1, 9, 9, 3, 11, 300),
    ("same_centre", 3, 6, 5, 5, 13, 150),
    ("same_whole", 2, 7, 6, 4, 5, 300),
    ("same_whole", 3, 32, 32, 32, 2, 3),
]


def check_patch_contract(rng, launch, device, cases=PATCH_CONTRACT_CASES, shuffle_positions=False):
    """Runs ``launch`` (a backend's ``patch_partials``) on every case and checks the combined partials row by row
    against a float64 softmax over explicitly cut candidate patches. Images are scanned in a random order with one
    left out; same-position rows sit at random centres; ``shuffle_positions`` also permutes the shared list."""
    from analytic_diffusion.ops import KeyBank
    from analytic_diffusion.ops.fused_patch import LOG2E, _finish
    from analytic_diffusion.ops.patch_retrieval import interior_positions

    for rule, c, h, w, k, R, n in cases:
        imgs = torch.randint(0, 256, (n, c, h, w), generator=rng, dtype=torch.uint8)
        if rule == "shared":
            pos = interior_positions(h, w, k)
            if shuffle_positions:
                pos = pos[torch.randperm(pos.shape[0], generator=rng)]
        else:
            pos = torch.stack([torch.randint(0, h, (R,), generator=rng), torch.randint(0, w, (R,), generator=rng)], 1)
            if k == h == w:
                pos[:] = k // 2  # the one crop position of a k = H = W crop
        idx = torch.randperm(n, generator=rng)[: n - 1].to(torch.int32)  # not every image, not in order
        sigma = torch.tensor([1e-3, 0.5, 1e3] * R)[:R].double()
        coef = 1.0 / (2 * sigma * sigma)
        kb = KeyBank(imgs.reshape(n, -1), 2 / 255, -1.0, image_shape=(c, h, w))
        # float64 oracle: every candidate patch cut from the zero-padded images; queries near one of them (the
        # regime samplers visit; noise capped at 2), so that the fp32 logits are well conditioned at every σ
        y = imgs.double()[idx.long()] * kb.scale + kb.shift
        pad = torch.nn.functional.pad(y, (k // 2,) * 4)
        cands, vals = [], []
        for r in range(R):
            centres = (pos if rule == "shared" else pos[r : r + 1]).tolist()
            cands.append(torch.stack([pad[:, :, a : a + k, b : b + k] for a, b in centres], 1).reshape(-1, c * k * k))
            vals.append(
                cands[-1]
                if rule == "same_whole"
                else torch.stack([y[:, :, a, b] for a, b in centres], 1).reshape(-1, c)
            )
        q = torch.stack([cd[torch.randint(0, cd.shape[0], (1,), generator=rng)].squeeze(0) for cd in cands])
        q = (q + sigma.clamp(max=2.0)[:, None] * torch.randn(q.shape, generator=rng, dtype=torch.float64)).float()
        splits = 2 if rule != "same_whole" else 1  # 150 candidates per split or more: several tiles
        got = _finish(
            *launch(
                q.to(device),
                imgs.to(device),
                idx.to(device),
                pos.to(torch.int32).to(device),
                (coef * LOG2E).float().to(device),
                k=k,
                scale=kb.scale,
                shift=kb.shift,
                splits=splits,
                rule=rule,
            )
        )
        assert torch.isfinite(got.o).all() and torch.isfinite(got.l).all()
        for r in range(R):
            z = -coef[r] * ((q[r].double() - cands[r]) ** 2).sum(1)
            ref = torch.softmax(z, 0) @ vals[r]
            assert torch.allclose((got.o[r] / got.l[r]).cpu().double(), ref, rtol=1e-4, atol=1e-5), (rule, r)
            # the max logit carries the fp32 rounding of y = u·scale + shift: ~coef·|q − y|·6e-8 per value
            assert abs(float(got.m[r]) - float(z.max())) <= 2e-3 * max(1.0, abs(float(z.max()))), (rule, r)
