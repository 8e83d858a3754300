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


def knn_bruteforce(x, y, k):
    d = ((x.double()[:, None, :] - y.double()[None]) ** 2).sum(-1)
    order = torch.argsort(d, dim=1, stable=True)[:, :k]
    return torch.gather(d, 1, order), order


def mirror(images):
    """(N, C, H, W) -> mirrored left-right."""
    return images.flip(-1)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


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
