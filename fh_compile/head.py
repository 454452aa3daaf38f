"""FlashHeadLMHead: a drop-in LM head module, swapped onto one model instance (no patching)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from custom_ops import FlashHeadTopK, flashhead_reference, flashhead_topk
from fh_compile.always import always_scored_ids, check_always_ids
from fh_compile.assets import FlashHeadAssets
from fh_compile.sampling import SamplingConfig, gumbel_probe_noise, sample_candidates

log = logging.getLogger(__name__)

KERNELS = ("triton", "reference")


@dataclass(frozen=True)
class FlashHeadConfig:
    """probes: clusters scored exactly per row.  k: candidates kept per row (the support of
    sampling and of the logits the module returns).  dense_above_rows: rows per call above which
    the dense head is cheaper and is used instead (None: `default_dense_above_rows`, measured).
    kernel: "triton" runs torch.ops.flashhead.topk (Triton on CUDA, the reference on CPU); "reference"
    calls the pure-PyTorch custom_ops.reference.flashhead_reference on any device (a baseline
    for benchmarks: Inductor compiles it like any other PyTorch code)."""

    probes: int = 256
    k: int = 64
    dense_above_rows: int | None = None
    enabled: bool = True
    kernel: str = "triton"

    def __post_init__(self) -> None:
        if self.probes < 1:
            raise ValueError(f"probes must be >= 1, got {self.probes}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.dense_above_rows is not None and self.dense_above_rows < 0:
            raise ValueError(f"dense_above_rows must be >= 0, got {self.dense_above_rows}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")


def default_dense_above_rows(vocab: int, probes: int, cluster_size: int) -> int:
    """Rows per call above which the dense head is used when dense_above_rows is None:
    min(64, V // (probes * C)), i.e. while the rows' candidates together are at most one
    vocabulary (B * probes * C <= V), and never above 64 rows (not measured).

    From benchmarks/head_latency on an H100 (torch 2.11, triton 3.6, V=151,936, D=1,536, C=16,
    bf16, random weights and h, 2026-11-26), Triton op vs dense + argmax: faster at every B <= 32
    and probes <= 512 (B=32, probes 256: 0.153 vs 0.203 ms; probes 512: 0.190 vs 0.203), and at
    B=64 up to probes 128 (0.189 vs 0.211 ms); slower at B=64, probes 256 (0.239 vs 0.211 ms).
    The rule gives 64 rows at probes 64/128, 37 at 256 and 18 at 512 (dense at B=32, probes
    512, a 1.07x win given up).  Random h shares fewer clusters than a real batch does, so this
    errs towards dense.  0 when probes * C > V: then even one row reads the whole head.
    """
    return min(64, vocab // (probes * cluster_size))


class FlashHeadLMHead(nn.Module):
    """Replaces `lm_head`.  forward(hidden [..., D]) -> logits [..., V] fp32 that hold the exact
    logits of FlashHead's k candidates and -inf elsewhere, so `model.generate` (greedy, top-k,
    top-p, temperature) works unchanged.  `topk` and `next_tokens` skip the [.., V] tensor.

    Buffers are named fh_* (not `weight`) so that Hugging Face weight tying can never overwrite
    the reordered rows.

    always_ids: vocabulary ids scored at every step whatever the probes (end-of-turn / eos
    tokens, see fh_compile.always), held as fixed-size buffers fh_always_ids [A] int64 and
    fh_always_rows [A] int64 (their rows in fh_rows, found once here through the inverse
    permutation, so a step costs A * D more weight bytes and no lookup).  Empty: none.
    """

    def __init__(self, assets: FlashHeadAssets, config: FlashHeadConfig,
                 always_ids: Sequence[int] = ()) -> None:
        super().__init__()
        K, C = assets.num_clusters, assets.cluster_size
        if config.probes > K:
            raise ValueError(f"probes={config.probes} exceeds the number of clusters K={K}")
        if config.k > config.probes * assets.min_cluster_size:
            raise ValueError(f"k={config.k} exceeds the candidates that {config.probes} probes "
                             f"guarantee ({config.probes * assets.min_cluster_size}); lower k")
        self.config = config
        self.cluster_size = C
        self.in_features, self.out_features = assets.hidden_size, assets.vocab_size
        self.fingerprint = assets.fingerprint
        self.register_buffer("fh_centroids", assets.centroids)
        self.register_buffer("fh_rows", assets.weight)
        self.register_buffer("fh_offsets", assets.offsets)
        self.register_buffer("fh_token_ids", assets.token_ids)
        inv = torch.empty_like(assets.token_ids)
        inv[assets.token_ids] = torch.arange(assets.vocab_size, device=inv.device)
        self.register_buffer("fh_inverse", inv)                        # vocab id -> row
        self.always_ids = tuple(check_always_ids(always_ids, assets.vocab_size))
        ids = torch.tensor(self.always_ids, dtype=torch.int64, device=inv.device)
        self.register_buffer("fh_always_ids", ids)                     # [A] int64 vocab ids
        self.register_buffer("fh_always_rows", inv[ids])               # [A] int64 their rows

    # -- which path runs ------------------------------------------------------------------------
    def path_for(self, rows: int) -> str:
        """'flashhead' or 'dense' for a call with `rows` hidden states (static at trace time)."""
        if not self.config.enabled:
            return "dense"
        limit = self.config.dense_above_rows
        if limit is None:
            limit = default_dense_above_rows(self.out_features, self.config.probes,
                                             self.cluster_size)
        return "dense" if rows > limit else "flashhead"

    def _note_path(self, rows: int, path: str) -> None:
        if path == "dense" and self.config.enabled and not torch.compiler.is_compiling():
            log.info("FlashHead: %d rows per call is above dense_above_rows; using the dense head",
                     rows)

    # -- compute --------------------------------------------------------------------------------
    def dense_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, D] -> fp32 logits [N, V] in vocabulary order, from the same (reordered) rows."""
        out = torch.nn.functional.linear(h, self.fh_rows.to(h.dtype)).float()
        return out.index_select(1, self.fh_inverse)

    def topk(self, h: torch.Tensor, k: int | None = None,
             centroid_noise: torch.Tensor | None = None) -> FlashHeadTopK:
        """h [N, D] -> FlashHeadTopK(ids [N, k], logits [N, k]); dense top-k where path_for says."""
        k = k or self.config.k
        h = h.contiguous()  # rows sliced from [B, T, D] (HF's logits_to_keep) are strided
        path = self.path_for(h.shape[0])
        self._note_path(h.shape[0], path)
        if path == "dense":
            vals, ids = self.dense_logits(h).topk(k, dim=-1)
            return FlashHeadTopK(ids, vals)
        always, rows = ((self.fh_always_ids, self.fh_always_rows) if self.always_ids
                        else (None, None))
        if self.config.kernel == "reference":
            ids, logits = flashhead_reference(h, self.fh_centroids, self.fh_rows, self.fh_offsets,
                                              self.fh_token_ids, self.config.probes,
                                              self.cluster_size, k, centroid_noise, always, rows)
            return FlashHeadTopK(ids, logits)
        return flashhead_topk(h, self.fh_centroids, self.fh_rows, self.fh_offsets,
                              self.fh_token_ids, probes=self.config.probes,
                              cluster_size=self.cluster_size, k=k, centroid_noise=centroid_noise,
                              always_ids=always, always_rows=rows)

    def next_tokens(self, h: torch.Tensor, sampling: SamplingConfig,
                    softcap: float | None = None) -> torch.Tensor:
        """h [N, D] -> next token ids [N] int64 (greedy or sampled over the candidates).
        softcap: the model's final logit soft-capping, applied to the candidates' logits before
        sampling, as transformers applies it to the dense logits (Gemma 2)."""
        noise = None
        if sampling.stochastic_probing and self.path_for(h.shape[0]) == "flashhead":
            noise = gumbel_probe_noise(h.shape[0], self.fh_centroids.shape[0],
                                       sampling.temperature, h.device)
        k = 1 if not sampling.do_sample else self.config.k
        ids, logits = self.topk(h, k, noise)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return sample_candidates(ids, logits, sampling)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        lead, D = hidden.shape[:-1], hidden.shape[-1]
        h = hidden.reshape(-1, D)
        if self.path_for(h.shape[0]) == "dense":
            self._note_path(h.shape[0], "dense")
            return self.dense_logits(h).reshape(*lead, self.out_features)
        cand = self.topk(h)
        out = torch.full((h.shape[0], self.out_features), float("-inf"), device=h.device)
        return out.scatter(1, cand.ids, cand.logits).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"V={self.out_features}, D={self.in_features}, K={self.fh_centroids.shape[0]}, "
                f"C={self.cluster_size}, probes={self.config.probes}, k={self.config.k}, "
                f"enabled={self.config.enabled}, kernel={self.config.kernel}, "
                f"always_ids={list(self.always_ids)}")


def swap_head(model: nn.Module, assets: FlashHeadAssets, *, probes: int = 256, k: int = 64,
              dense_above_rows: int | None = None, enabled: bool = True, kernel: str = "triton",
              check_fingerprint: bool = True,
              always_ids: Sequence[int] | None = None) -> FlashHeadLMHead:
    """Install a FlashHeadLMHead as THIS model's output embedding; returns it.

    The assets must match the model's head (fingerprint), and are moved to the head's device and
    dtype.  `restore_dense_head(model)` puts the original head back.
    always_ids: vocabulary ids scored at every step whatever the probes; None: the assets' list
    (recorded by the builder, with the tokenizer's end-of-turn tokens) together with the model's
    eos ids (generation_config and config, `always_scored_ids(model)`); [] for none.
    """
    dense = _output_embeddings(model)
    if isinstance(dense, FlashHeadLMHead):
        raise ValueError("this model already has a FlashHead head; call restore_dense_head first")
    if getattr(dense, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported by FlashHead")
    if check_fingerprint:
        assets.check_matches(dense.weight)
    if always_ids is None:
        always_ids = sorted(set(assets.always_ids or ()) | set(always_scored_ids(model)))
    head = FlashHeadLMHead(assets.to(dense.weight.device, dense.weight.dtype),
                           FlashHeadConfig(probes=probes, k=k, dense_above_rows=dense_above_rows,
                                           enabled=enabled, kernel=kernel), always_ids)
    head._dense_head = [dense]  # a list: keeps the original out of the module tree / state_dict
    model.set_output_embeddings(head)
    return head


def restore_dense_head(model: nn.Module) -> nn.Module:
    """Undo swap_head on this model; returns the original dense head."""
    head = _output_embeddings(model)
    if not isinstance(head, FlashHeadLMHead):
        raise ValueError("this model has no FlashHead head to remove")
    dense = head._dense_head[0]
    model.set_output_embeddings(dense)
    return dense


def _output_embeddings(model: nn.Module) -> Any:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head (get_output_embeddings() is "
                         f"None); load a causal LM such as AutoModelForCausalLM")
    return head
