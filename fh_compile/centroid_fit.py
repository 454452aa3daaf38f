"""Fit FlashHead's scoring vectors (centroids [K, D]) to the model's own hidden states.

FlashHead probes the P clusters with the largest h . c_k and scores their tokens exactly, so a
token is found iff its cluster ranks among the top P.  The mean centroid makes h . c_k the cluster's
mean logit; but a cluster matters when its *largest* logits are high, and that depends on how its
rows spread around the mean (log sum_j exp z_j ~ mean + variance / 2, a term quadratic in h that a
mean cannot express).  The fit keeps the op ("h . c_k", same [K, D] tensor, same clustering) and
only moves the vectors: it minimizes the cross-entropy between the clusters' dense probability mass

    p_k(h) = sum_{j in cluster k} softmax(h W^T / T)_j

and softmax_k(h . c_k), over hidden states of unlabeled calibration text (fh_compile.calibration),
starting from the mean centroids, with Adam.  pull_only (the default) updates only the clusters
that hold target mass at a position: a cluster the calibration text never needs keeps its mean
centroid instead of being pushed down (see the measurements below).  `argmax_weight` mixes in the
cross-entropy of the
cluster holding the dense argmax (the top-1 agreement target).  Only the top_clusters clusters of
p are kept per position (the rest of p is dropped: its mass is tiny and spread thin).  A held-out
tenth of the positions picks the epoch (best held-out rank of the argmax's cluster), so the fit
stops before it learns the calibration text by heart: the held-out metric is the mean over
P in (P0/4, P0/2, P0, 2 P0) (P0 = select_probes, each at most K / 2) of the fraction of positions
whose argmax's cluster is not among the top P.

Measured (Qwen2.5-Coder-1.5B, refine-6 clustering, 30,000 positions of Python standard-library
docstrings, benchmarks.fidelity top-1 agreement at P = 32 / 128 / 256 on 4,000 positions each):
  mean centroids              GSM8K 0.959 / 0.992 / 0.996   IFEval 0.910 / 0.976 / 0.988
                              MMLU-Pro 0.914 / 0.972 / 0.984
  pull-only, lr 3e-5, 2 ep.   GSM8K 0.975 / 0.994 / 0.997   IFEval 0.955 / 0.983 / 0.990
    (the default)             MMLU-Pro 0.948 / 0.978 / 0.988
  pull-only, lr 1e-4, 2 ep.   GSM8K 0.973 / 0.993 / 0.995   IFEval 0.949 / 0.982 / 0.988
  full softmax, lr 1e-5, 2    GSM8K 0.961 / 0.992 / 0.996   IFEval 0.949 / 0.982 / 0.989
  full softmax, lr 1e-4, 6    held-out docstring misses fall 8x, but GSM8K 0.947 / 0.984 / 0.990:
                              worse than the mean centroids at P >= 64 on all three.
With the full softmax the fit learns a prior of the calibration text: the normalizer pushes down
clusters that never matter in that text, and their tokens are then missed elsewhere.  Pull-only
updates avoid that; larger steps still over-fit (lr 1e-4 loses at P = 256 on GSM8K and IFEval).

Cost: the targets need one dense pass (N x V x D multiply-adds, bf16 on CPU); each epoch is two
N x K x D products (scores, gradient).  30,000 positions, 2 epochs, 2 shared CPU cores:
Qwen2.5-Coder-1.5B (K = 9,496, D = 1,536) 176 s (targets 103 s), Gemma-3-270M (K = 16,384,
D = 640) 141 s, SmolLM2-135M 15 s (benchmarks.build_time --fit-hidden times it).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class CentroidFitConfig:
    epochs: int = 2
    lr: float = 3e-5              # Adam step, in units of the centroid entries (see the note above)
    batch: int = 256
    temperature: float = 1.0      # of the dense softmax that gives the cluster masses
    top_clusters: int = 32        # clusters of p kept per position
    argmax_weight: float = 0.0    # weight of the argmax-cluster cross-entropy (0..1)
    holdout: float = 0.1          # fraction of positions held out to pick the epoch
    pull_only: bool = True        # update only clusters with target mass (no push-down)
    select_probes: int = 128      # held-out metric: argmax cluster missed at P/4, P/2, P, 2P
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch < 1 or self.top_clusters < 1 or self.select_probes < 1:
            raise ValueError("epochs, batch, top_clusters and select_probes must be >= 1")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"lr and temperature must be > 0, got {self.lr}, {self.temperature}")
        if not 0 <= self.argmax_weight <= 1:
            raise ValueError(f"argmax_weight must lie in [0, 1], got {self.argmax_weight}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must lie in (0, 1), got {self.holdout}")


@dataclass
class FitResult:
    """centroids [K, D] fp32 (the best epoch's); history: one dict per epoch (0 = the initial
    centroids) with the training loss and the held-out miss rate (see the module docstring)."""

    centroids: torch.Tensor
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, cfg: CentroidFitConfig, positions: int) -> dict:
        """JSON-ready record for the assets' build metadata."""
        return {"config": asdict(cfg), "positions": positions, "best_epoch": self.best_epoch,
                "history": self.history, "seconds": round(self.seconds, 1)}


@dataclass(frozen=True)
class ClusterTargets:
    """Per position: idx [N, M] int64 the M clusters of largest dense mass, mass [N, M] fp32 their
    mass (sums to <= 1), top1 [N] int64 the cluster of the dense argmax."""

    idx: torch.Tensor
    mass: torch.Tensor
    top1: torch.Tensor


def cluster_targets(h: torch.Tensor, weight: torch.Tensor, token_cluster: torch.Tensor, K: int,
                    temperature: float, top: int, chunk: int = 512) -> ClusterTargets:
    """Dense cluster masses of hidden states h [N, D] under the head weight [V, D] (vocabulary
    order; token_cluster [V] int64 the cluster of each id).  Logits in bf16 x bf16 -> fp32 (the
    targets are soft; the product is N x V x D)."""
    W = weight.to(torch.bfloat16)
    m = min(top, K)
    idx, mass, top1 = [], [], []
    for s in range(0, h.shape[0], chunk):
        z = (h[s:s + chunk].to(torch.bfloat16) @ W.t()).float()        # [n, V] fp32
        top1.append(token_cluster[z.argmax(1)])
        p = torch.softmax(z / temperature, dim=1)
        cm = torch.zeros(z.shape[0], K).index_add_(1, token_cluster, p)  # [n, K]
        v, i = cm.topk(m, dim=1)
        idx.append(i)
        mass.append(v)
    return ClusterTargets(torch.cat(idx), torch.cat(mass), torch.cat(top1))


def argmax_cluster_rank(h: torch.Tensor, centroids: torch.Tensor, top1: torch.Tensor,
                        chunk: int = 1024) -> torch.Tensor:
    """[N] int64: rank (0 = best) of cluster top1[n] under the scores h[n] . centroids."""
    out = []
    for s in range(0, h.shape[0], chunk):
        sc = h[s:s + chunk].float() @ centroids.t()                     # [n, K]
        own = sc.gather(1, top1[s:s + chunk, None])
        out.append((sc > own).sum(1))
    return torch.cat(out)


def fit_centroids(h: torch.Tensor, weight: torch.Tensor, token_cluster: torch.Tensor,
                  init: torch.Tensor, cfg: CentroidFitConfig, log=print) -> FitResult:
    """Fitted centroids [K, D] for hidden states h [N, D], head weight [V, D] (vocabulary order),
    token_cluster [V] int64 and initial centroids init [K, D] (the mean centroids)."""
    K, D = init.shape
    if h.dim() != 2 or h.shape[1] != D or weight.shape[1] != D:
        raise ValueError(f"hidden states must be [N, {D}] like the centroids and the head, got "
                         f"{tuple(h.shape)} and head {tuple(weight.shape)}")
    if token_cluster.shape != (weight.shape[0],):
        raise ValueError("token_cluster must hold one cluster id per vocabulary row")
    N = h.shape[0]
    n_hold = max(1, int(round(N * cfg.holdout)))
    if N - n_hold < 1:
        raise ValueError(f"need at least 2 hidden states to fit centroids, got {N}")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(N, generator=gen)
    hold, train = perm[:n_hold], perm[n_hold:]
    hf = h.float()
    tg = cluster_targets(hf, weight, token_cluster, K, cfg.temperature, cfg.top_clusters)
    log(f"centroid fit: targets for {N} positions in {time.perf_counter() - t0:.0f} s")

    C = init.detach().float().clone()                                   # fp32 master copy
    C.grad = torch.zeros_like(C)
    opt = torch.optim.Adam([C], lr=cfg.lr)
    hb16 = h.to(torch.bfloat16)

    probes = sorted({max(1, min(K // 2, cfg.select_probes * f // 4)) for f in (1, 2, 4, 8)})

    def held_out_miss() -> float:
        with torch.no_grad():
            rank = argmax_cluster_rank(hf[hold], C, tg.top1[hold])
        return sum(float((rank >= P).float().mean()) for P in probes) / len(probes)

    best = (held_out_miss(), 0, C.detach().clone())
    history = [{"epoch": 0, "held_out_miss": best[0]}]
    for epoch in range(1, cfg.epochs + 1):
        order = train[torch.randperm(train.numel(), generator=gen)]
        total = 0.0
        for s in range(0, order.numel(), cfg.batch):
            b = order[s:s + cfg.batch]
            # Gradients by hand so both products run in bf16 (5x faster than fp32 on AMX CPUs):
            # loss = -sum_k t_k log q_k with q = softmax(h C^T), so dloss/dscores = q sum(t) - t.
            hb = hb16[b]                                                # [n, D] bf16
            logq = torch.log_softmax((hb @ C.to(torch.bfloat16).t()).float(), dim=1)   # [n, K]
            t = torch.zeros_like(logq).scatter_add_(1, tg.idx[b], tg.mass[b])
            if cfg.argmax_weight > 0:
                onehot = torch.zeros_like(logq).scatter_(1, tg.top1[b, None], 1.0)
                t = (1 - cfg.argmax_weight) * t + cfg.argmax_weight * onehot
            loss = -(t * logq).sum(1).mean()
            dscores = (logq.exp() * t.sum(1, keepdim=True) - t) / b.numel()  # [n, K]
            if cfg.pull_only:            # clusters absent from the targets keep their scores
                dscores = dscores * (t > 0)
            C.grad.copy_((dscores.to(torch.bfloat16).t() @ hb).float())      # [K, D]
            opt.step()
            total += float(loss) * b.numel()
        miss = held_out_miss()
        history.append({"epoch": epoch, "train_loss": total / train.numel(),
                        "held_out_miss": miss})
        log(f"centroid fit: epoch {epoch} loss {total / train.numel():.4f} held-out miss "
            f"{miss:.4f} (epoch 0: {history[0]['held_out_miss']:.4f}) "
            f"({time.perf_counter() - t0:.0f} s)")
        if miss < best[0]:                     # ties keep the earlier (less fitted) epoch
            best = (miss, epoch, C.detach().clone())
    return FitResult(best[2], best[1], history, time.perf_counter() - t0)


def fit_assets(assets, hidden: torch.Tensor, cfg: CentroidFitConfig, source: str,
               log=print):
    """A copy of FlashHeadAssets whose centroids are fitted to hidden states [N, D] (same clusters,
    rows and ids; the assets' own centroids are the starting point).  The fit and its `source`
    (a sentence naming the calibration text) are recorded in params["centroid_fit"]."""
    from dataclasses import replace

    sizes = (assets.offsets[1:] - assets.offsets[:-1]).cpu()
    row_cluster = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)   # [V] by row
    res = fit_centroids(hidden.cpu(), assets.weight.cpu(), row_cluster,
                        assets.centroids.cpu().float(), cfg, log)
    params = dict(assets.params)
    params["centroid_fit"] = {**res.summary(cfg, hidden.shape[0]), "source": source,
                              "init": params.get("centroid_mode", "mean")}
    return replace(assets, params=params,
                   centroids=res.centroids.to(device=assets.centroids.device,
                                              dtype=assets.centroids.dtype))
