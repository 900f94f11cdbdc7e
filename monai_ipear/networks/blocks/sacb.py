"""SACB-Net building blocks: k-means, the spatial-awareness convolution block and the matching-score flow estimator.

SACB-Net (Cheng et al., CVPR 2025) replaces the shared convolution of a feature pyramid by a convolution whose
kernel is modulated per region: the voxels are clustered by their local patch means (k-means, no gradient) and
every cluster gets its own kernel mask and bias, predicted by small MLPs from the cluster centroid.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

__all__ = ["kmeans", "SpatialAwareConvBlock", "MatchingFlowEstimator", "neighbourhood_offsets"]

LEAKY = ("leakyrelu", {"negative_slope": 0.1})


@torch.no_grad()
def kmeans(
    x: torch.Tensor, num_clusters: int, num_iters: int | None = None, seed: int = 0, tol: float = 1e-6,
    max_iters: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding on ``x`` ``(N, D)``; deterministic for a given ``seed``.

    Written in plain PyTorch (no gradient): MONAI has no clustering, and the usual GPU k-means packages are
    CUDA-only or unmaintained; this runs on any device and is a few lines. Empty clusters keep their centroid.

    Args:
        x: ``(N, D)`` points.
        num_clusters: ``K`` (clamped to ``N``).
        num_iters: maximum Lloyd iterations; ``None`` (default): run to convergence, as the SACB-Net reference
            (``tol=1e-9``, no practical iteration limit), with ``max_iters`` as a safety cap.
        seed: seed of the k-means++ initialisation (a private generator; the global RNG is untouched).
        tol: converged when no centroid moves by more than ``tol`` (Euclidean) or no label changes.
        max_iters: safety cap on the Lloyd iterations when ``num_iters`` is ``None``.

    Returns:
        ``labels`` ``(N,)`` long in ``[0, K)`` and ``centroids`` ``(K, D)``.
    """
    x = x.detach().float()
    n = x.shape[0]
    k = max(1, min(int(num_clusters), n))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    # k-means++ seeding: first centre uniformly, then proportional to the squared distance to the nearest centre
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = x[first : first + 1]
    d2 = (x - centroids).pow(2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # all points coincide with a centre: pick any remaining point
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial((d2 / total).cpu(), 1, generator=gen))
        centroids = torch.cat([centroids, x[idx : idx + 1]], 0)
        d2 = torch.minimum(d2, (x - x[idx : idx + 1]).pow(2).sum(1))
    labels = _nearest(x, centroids)
    for _ in range(max_iters if num_iters is None else num_iters):
        one_hot = F.one_hot(labels, k).to(x.dtype)  # (N, K)
        counts = one_hot.sum(0)
        sums = one_hot.t() @ x
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        shift = (new - centroids).norm(dim=1).max()
        centroids = new
        new_labels = _nearest(x, centroids)
        unchanged = bool(torch.equal(new_labels, labels))
        labels = new_labels
        if shift <= tol or unchanged:  # unchanged labels: the next update would give the same centroids
            break
    return labels, centroids


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid per row of ``x`` (squared Euclidean; the ``|x|^2`` term is constant per row)."""
    return (centroids.pow(2).sum(1)[None] - 2 * x @ centroids.t()).argmin(1)


def neighbourhood_offsets(spatial_dims: int, radius: int = 1, device=None) -> torch.Tensor:
    """All integer offsets of a ``(2 * radius + 1) ** spatial_dims`` neighbourhood, ``(n, spatial_dims)`` float."""
    r = range(-radius, radius + 1)
    return torch.tensor(list(itertools.product(r, repeat=spatial_dims)), dtype=torch.float32, device=device)


class SpatialAwareConvBlock(nn.Module):
    """The spatial-awareness convolution block (SACB).

    ``x -> proj_in`` (conv + InstanceNorm + LeakyReLU); the per-voxel means of its ``3**d`` patches (per channel,
    zero padded) are clustered by :func:`kmeans` into ``num_clusters`` regions (separately per sample, no gradient);
    cluster ``j`` convolves with ``w * mask_j`` (``mask_j = sigmoid-MLP(centroid_j)``, one value per kernel position,
    shared by all channel pairs) and adds ``bias_j = MLP(centroid_j)``; LeakyReLU; residual ``+ x``.

    Args:
        spatial_dims: 2 or 3.
        channels: input = output channels (the residual needs them equal).
        num_clusters: ``N`` regions (paper: 7 by default).
        kernel_size: odd kernel size of the spatially-aware convolution.
        hidden_kernel, hidden_bias: widths of the kernel-mask MLP (3 layers) and the bias MLP (3 layers).
        seed: k-means seed (the clustering is deterministic given it).
        kmeans_iters: Lloyd iterations; ``None`` (default): to convergence (see :func:`kmeans`).

    ``forward(x)``: ``(B, channels, *spatial)`` -> same shape. The cluster map of the last call is kept in
    ``last_labels`` ``(B, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_clusters: int = 7,
        kernel_size: int = 3,
        hidden_kernel: int = 128,
        hidden_bias: int = 64,
        seed: int = 0,
        kmeans_iters: int | None = None,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.num_clusters = num_clusters
        self.kernel_size = kernel_size
        self.seed = seed
        self.kmeans_iters = kmeans_iters
        taps = kernel_size**spatial_dims
        self.proj_in = Convolution(spatial_dims, channels, channels, kernel_size=3, act=LEAKY, norm="instance")
        self.weight = nn.Parameter(torch.empty(channels, channels, taps))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.kernel_mlp = nn.Sequential(
            nn.Linear(channels, hidden_kernel),
            nn.ReLU(),
            nn.Linear(hidden_kernel, hidden_kernel),
            nn.ReLU(),
            nn.Linear(hidden_kernel, taps),
            nn.Sigmoid(),
        )
        self.bias_mlp = nn.Sequential(
            nn.Linear(channels, hidden_bias),
            nn.ReLU(),
            nn.Linear(hidden_bias, hidden_bias),
            nn.ReLU(),
            nn.Linear(hidden_bias, channels),
        )
        self.act = nn.LeakyReLU(0.1)
        self.last_labels: torch.Tensor | None = None

    def patch_means(self, x: torch.Tensor) -> torch.Tensor:
        """Per-voxel, per-channel means of the zero-padded ``kernel_size**d`` patches: ``(B, C, *spatial)``."""
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[self.spatial_dims - 1]
        x = F.pad(x, [self.kernel_size // 2] * (2 * self.spatial_dims))  # explicit: pooling refuses tiny maps
        return pool(x, self.kernel_size, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        y = self.proj_in(x)
        feats = self.patch_means(y).flatten(2).transpose(1, 2)  # (B, N_vox, C)
        labels, centroids = [], []
        for i in range(b):  # clustering is per sample, so a batch equals its samples run one by one
            lab, cen = kmeans(feats[i], self.num_clusters, self.kmeans_iters, self.seed)
            if cen.shape[0] < self.num_clusters:  # fewer voxels than clusters: pad with unused centroids
                cen = torch.cat([cen, cen[-1:].expand(self.num_clusters - cen.shape[0], -1)], 0)
            labels.append(lab)
            centroids.append(cen)
        lab = torch.stack(labels)  # (B, N_vox)
        cen = torch.stack(centroids).to(y.dtype)  # (B, K, C), no gradient
        k = self.num_clusters
        masks = self.kernel_mlp(cen)  # (B, K, taps)
        bias = self.bias_mlp(cen)  # (B, K, C)
        # per-sample, per-cluster kernels (B*K*C_out, C_in, *kernel), applied with one grouped convolution
        w = (masks[:, :, None, None, :] * self.weight[None, None]).reshape(b * k * c, c, *([self.kernel_size] * self.spatial_dims))
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        out = conv(y.reshape(1, b * c, *spatial), w, padding=self.kernel_size // 2, groups=b)
        out = out.reshape(b, k, c, -1) + bias[..., None]  # (B, K, C, N_vox)
        select = F.one_hot(lab, k).transpose(1, 2).to(out.dtype)  # (B, K, N_vox)
        out = (out * select[:, :, None]).sum(1).reshape(b, c, *spatial)
        self.last_labels = lab.reshape(b, *spatial)
        return self.act(out) + x


class MatchingFlowEstimator(nn.Module):
    """SACB-Net's matching-score flow estimator (no parameters).

    For every voxel ``x`` the fixed feature ``f(x)`` is scored against the moving features ``m(x + o)`` for the
    offsets ``o`` of the ``(2r + 1)**d`` neighbourhood (dot products, zero padding outside the grid); the flow is
    the softmax-weighted mean offset ``sum_o softmax(f(x) . m(x + o)) o`` (a soft argmax), in voxels, pull
    convention (the moving image is read at ``x + flow``).

    Args:
        spatial_dims: 2 or 3.
        radius: neighbourhood radius ``r`` (paper: 1, i.e. 3x3x3).

    ``forward(moving, fixed)``: ``(B, C, *spatial)`` each -> ``(B, spatial_dims, *spatial)``.
    """

    def __init__(self, spatial_dims: int, radius: int = 1) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.radius = radius
        self.register_buffer("offsets", neighbourhood_offsets(spatial_dims, radius), persistent=False)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        r = self.radius
        spatial = moving.shape[2:]
        padded = F.pad(moving, [r] * (2 * self.spatial_dims))
        scores = []
        for off in self.offsets.long().tolist():
            idx = (slice(None), slice(None)) + tuple(slice(r + o, r + o + s) for o, s in zip(off, spatial))
            scores.append((fixed * padded[idx]).sum(1))
        attn = torch.stack(scores, 1).softmax(1)  # (B, n_offsets, *spatial)
        return torch.einsum("bn...,nd->bd...", attn, self.offsets.to(attn.dtype))
