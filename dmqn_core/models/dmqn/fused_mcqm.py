"""MCQM's fused path (section 2.2, eq. 4-10): assignment and pooling in chunks of histories, no (H, L, N, W) kept.

Written plainly (mcqm_reference.py), the training path materialises the scores, the noise, the
logits, the softmax, the one-hot assignment and the straight-through sum, each (H, L, N, W): at
L = 1000 and N W = 128 that is 16M floats apiece, written and read several times per step, and
autograd keeps most of them for the backward. Here the forward walks over chunks of histories and
keeps only the codeword z (H, N, L) of every behavior; the backward recomputes scores, noise and
softmax chunk by chunk. Pooling is a scatter-add, O(L N D) instead of the one-hot matmul's O(L N W D).

The gradient is the straight-through estimator's, written out (per history, codebook n, codeword k;
r_k the cluster mean, n_k its size, G_k = dL/dr_k / max(n_k, 1)):
  pooling (eq. 9-10)     de_l += G_{z_l}                      (real behaviors only)
  straight-through       dp_lk = G_k · e_l          ("plain")
                         dp_lk = G_k · (e_l - r_k)  ("centred", r_k detached)
  usage_loss             dp_lk += dL/dmean_prob_k / (real behaviors of the batch)
  softmax (eq. 6)        dt = p ⊙ (dp - Σ_k p_k dp_k),  ds = dt / tau   (t = (s + g) / tau, s / tau + g or s / tau)
  scores (eq. 4-5)       de_l += ds_l @ folded,  dfolded += ds^T e
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

# Elements of one chunk's (rows, L, N, W) tensors: 512k float32 = 2 MB, small enough that the dozen
# passes over a chunk (scores, noise, softmax, its backward) stay in the CPU's cache.
CHUNK_ELEMENTS = 1 << 19
# On a GPU a chunk is a dozen kernel launches, and small chunks leave it idle between them: 16M elements
# (64 MB of float32 per tensor; the backward holds about four at once) bound the memory instead.
CUDA_CHUNK_ELEMENTS = 1 << 24
# The per-forward seed of the Gumbel noise.
SEED_BOUND = 1 << 62
# Elements of noise drawn from one private generator (256 kB of float32): small enough to spread one
# long history over threads, large enough that seeding a generator (about 20 us) costs little.
NOISE_BLOCK = 1 << 16

T = TypeVar("T")


def chunk_rows(length: int, slots: int, device: torch.device) -> int:
    """Histories per chunk for histories of `length` behaviors and N W = `slots` codewords, on `device`."""
    elements = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, elements // max(length * slots, 1))


def draw_seed(generator: torch.Generator | None = None) -> int:
    """The seed of one draw of fill_gumbel: per training forward from torch's global generator (so torch.manual_seed
    reproduces the noise), or from ``generator``."""
    if generator is None:
        return int(torch.randint(SEED_BOUND, (1,)).item())
    return int(torch.randint(SEED_BOUND, (1,), generator=generator, device=generator.device).item())


def fill_gumbel(out: Tensor, seed: int, first_row: int) -> Tensor:
    """Gumbel(0, 1) noise into out (rows, ...) in place, row r being history first_row + r.

    Each block of NOISE_BLOCK elements of a history's noise comes from a private generator seeded by
    (seed, history, block): the noise of a history depends on the seed and its row only, not on how
    rows are chunked, so the fused backward regenerates exactly what the forward drew without storing
    it, and one call over the whole batch gives the noise of every chunk (what the tests hand
    mcqm_reference). It is MCQM's one Gumbel sampler: the diagnostics draw their noise here too.
    g = -log(-log(u)), u ~ U(0, 1) in place; u = 0 gives -inf, a codeword not chosen. On CPU the uniforms come from
    numpy's SFC64, which fills float32 about 1.6x faster than torch's mt19937 and releases the GIL,
    so the blocks are filled on torch's number of threads (the noise is drawn twice per step, forward
    and backward, and is the largest single cost of the fused path).
    """
    if out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64):
        rows = out.detach().numpy().reshape(out.shape[0], -1)
        blocks = [(r, b) for r in range(rows.shape[0]) for b in range(0, rows.shape[1], NOISE_BLOCK)]

        def fill(part: list[tuple[int, int]]) -> None:
            for r, b in part:
                generator = np.random.Generator(np.random.SFC64([seed, first_row + r, b]))
                generator.random(dtype=rows.dtype, out=rows[r, b : b + NOISE_BLOCK])

        workers = min(torch.get_num_threads(), len(blocks))
        if workers > 1:
            list(_threads().map(fill, [blocks[i::workers] for i in range(workers)]))
        else:
            fill(blocks)
    else:
        generator = torch.Generator(device=out.device)
        for r in range(out.shape[0]):
            for b, block in enumerate(out[r].view(-1).split(NOISE_BLOCK)):
                generator.manual_seed(hash((seed, first_row + r, b)) & (SEED_BOUND - 1))
                block.uniform_(generator=generator)
    return out.log_().neg_().log_().neg_()


@functools.cache
def _threads() -> ThreadPoolExecutor:
    """The threads that fill noise blocks and run chunks in parallel (numpy and torch release the GIL)."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="dmqn-mcqm")


def map_chunks(work: Callable[[int, int], T], histories: int, rows: int, device: torch.device) -> list[T]:
    """work(h0, h1) for every chunk of `rows` histories, in chunk order; on the CPU on torch's number of threads.

    Each thread takes whole chunks and runs torch single-threaded inside them: a chunk's dozen small
    ops, each parallelised inside, would wait at a barrier per op for a second core, which on a
    loaded machine costs more than the op (measured: 2 torch threads slower than 1 on a busy 2-core
    machine). The results come back in chunk order, so sums over them do not depend on the threads.
    On a GPU the chunks run one after the other: each only queues kernels, and threads would contend
    for one stream (and torch.set_num_threads would change the CPU's threads for nothing).
    """
    chunks = [(h0, min(h0 + rows, histories)) for h0 in range(0, histories, rows)]
    threads = torch.get_num_threads()
    workers = min(threads, len(chunks)) if device.type == "cpu" else 1
    if workers <= 1:
        return [work(h0, h1) for h0, h1 in chunks]
    results: list[Any] = [None] * len(chunks)  # one slot per chunk, each filled by a worker
    # Grad and inference mode are thread-local: the workers run in the caller's.
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(first: int) -> None:
        # inference_mode(False) switches grad mode on, so it goes first.
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for i in range(first, len(chunks), workers):
                results[i] = work(*chunks[i])

    torch.set_num_threads(1)
    try:
        for future in [_threads().submit(run, i) for i in range(workers)]:
            future.result()
    finally:
        torch.set_num_threads(threads)
    return results


def noisy_logits(scores: Tensor, gumbel: Tensor | None, tau: float, tau_placement: str) -> Tensor:
    """eq. 6 as the options write it: (..., W) scores and noise (None: assign_noise="none") -> (..., W) logits.

    Reuses the noise buffer (and with no noise and tau = 1 returns the scores themselves). eq. 6
    writes log(score), but dot-product scores can be negative; we read the scores as logits, i.e.
    as the log of the softmax probabilities up to a per-behavior constant. Dividing by tau = 1 is
    skipped: x / 1 == x exactly, and it is a whole pass over the (..., W) tensor.
    """
    if gumbel is None:
        return scores if tau == 1.0 else scores / tau
    if tau_placement == "after_noise":
        t = gumbel.add_(scores)  # (s + g) / tau
        return t if tau == 1.0 else t.div_(tau)
    return gumbel.add_(scores if tau == 1.0 else scores / tau)  # s / tau + g: a sample of softmax(s / tau)


def pool_slots(z: Tensor, mask: Tensor, codebook_size: int) -> Tensor:
    """(H, N, L) codewords, (H, L) mask -> (H, N, L) flat slot (h N + n) W + z of each assignment.

    Padding goes to one extra slot, H N W, which the pooling drops: no padding is ever counted.
    """
    H, N, _ = z.shape
    first = (torch.arange(H, device=z.device)[:, None] * N + torch.arange(N, device=z.device)) * codebook_size
    return (first.unsqueeze(-1) + z).masked_fill_(~mask.unsqueeze(1), H * N * codebook_size)


def pool_means(e: Tensor, slot: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """eq. 9-10 by scatter-add: e (H, L, D), slots (H, N, L) -> cluster means (H, N, W, D), hard counts (H, N, W).

    One index_add_ of the L behaviors per codebook, O(L N D) where the one-hot matmul is O(L N W D);
    differentiable in e (autograd gathers the gradient back). Empty codewords stay exactly 0.
    """
    H, N, L = slot.shape
    D = e.shape[-1]
    slots = H * N * codebook_size
    flat = e.reshape(H * L, D)
    summed = e.new_zeros(slots + 1, D)
    for n in range(N):
        summed.index_add_(0, slot[:, n].reshape(-1), flat)
    size = torch.bincount(slot.reshape(-1), minlength=slots + 1)[:slots].to(e.dtype).view(H, N, codebook_size)
    return summed[:slots].view(H, N, codebook_size, D) / size.clamp(min=1.0).unsqueeze(-1), size


@torch.no_grad()
def argmax_codewords(e: Tensor, folded: Tensor) -> Tensor:
    """The noise-free codeword (eq. 7-8) of every behavior: e (H, L, D), folded (N, W, D) -> (H, N, L).

    Inference, and training with assign_noise="none", so that both take exactly the same codewords.
    In chunks of histories, so that the (H, N, W, L) scores never exist at once. torch's argmax over
    a short W is a scalar loop (about 3 ns an element on CPU), and so are torch.where and a bool
    comparison against a broadcast maximum; instead the scores are laid out with L innermost, where
    float ops over them vectorise, and the first maximal codeword is the largest rank W - w among the
    maximal ones: in place, s - max(s) >= 0 (exactly the maximal scores: with subnormals, torch's
    default, x - y == 0 only for x == y) times the rank, then its amax over W.
    """
    H, L, _ = e.shape
    N, W, D = folded.shape
    f = folded.reshape(N * W, D)
    # Codeword w ranks W - w: the highest-ranked maximal codeword is the first, as argmax breaks ties.
    rank = torch.arange(W, 0, -1, dtype=e.dtype, device=e.device).unsqueeze(-1)  # (W, 1)
    z = torch.empty(H, N, L, dtype=torch.long, device=e.device)

    def assign(h0: int, h1: int) -> None:
        s = (f @ e[h0:h1].transpose(1, 2)).unflatten(1, (N, W))  # (rows, N, W, L) eq. 5
        ranked = s.sub_(s.amax(dim=2, keepdim=True)).ge_(0.0).mul_(rank)  # (rows, N, W, L) eq. 8, in place
        # A NaN score matches no maximum (rank 0); clamping keeps its index in range, as argmax's would be.
        z[h0:h1] = (W - ranked.amax(dim=2).long()).clamp_(max=W - 1)  # (rows, N, L)

    map_chunks(assign, H, chunk_rows(L, N * W, e.device), e.device)
    return z


class _QuantizeContext(Protocol):
    """Autograd's context as FusedQuantize uses it: torch types it loosely (FunctionCtx lacks saved_tensors,
    and attributes of one's own are unknown to it), so forward and backward name what they put and read."""

    saved_tensors: tuple[Tensor, ...]
    # tau, assign_noise, tau_placement, centred, with_usage, seed, n_real (None unless with_usage)
    options: tuple[float, str, str, bool, bool, int, Tensor | None]

    def save_for_backward(self, *tensors: Tensor) -> None: ...

    def mark_non_differentiable(self, *args: Tensor) -> None: ...


class FusedQuantize(torch.autograd.Function):
    """MCQM's training path: e (H, L, D), folded (N, W, D), mask (H, L) -> clusters (H, N, W, D), size (H, N, W)
    and mean_prob (N, W).

    folded is an input so that autograd carries its gradient on to proj and codebooks; mean_prob
    (N, W) is the softmax averaged over the real behaviors (zero-sized unless with_usage).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: _QuantizeContext,
        e: Tensor,
        folded: Tensor,
        mask: Tensor,
        tau: float,
        assign_noise: str,
        tau_placement: str,
        centred: bool,
        with_usage: bool,
        seed: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        H, L, _ = e.shape
        N, W, D = folded.shape
        f = folded.reshape(N * W, D)
        valid = mask.to(e.dtype)  # (H, L)
        # Without noise the training codeword is the inference one, computed by the same function.
        z = argmax_codewords(e, folded) if assign_noise == "none" else mask.new_empty((H, N, L), dtype=torch.long)

        def assign(h0: int, h1: int) -> Tensor | None:
            s = (e[h0:h1] @ f.T).unflatten(-1, (N, W))  # (rows, L, N, W) eq. 4-5
            gumbel = None if assign_noise == "none" else fill_gumbel(torch.empty_like(s), seed, h0)
            t = noisy_logits(s, gumbel, tau, tau_placement)  # (rows, L, N, W) eq. 6
            if gumbel is not None:
                z[h0:h1] = t.argmax(dim=-1).transpose(1, 2)  # eq. 7: argmax of the softmax == argmax of the logits
            return torch.einsum("hlnw,hl->nw", t.softmax(dim=-1), valid[h0:h1]) if with_usage else None

        # (N, W) per chunk, or None; nothing to do without noise or usage.
        rows = chunk_rows(L, N * W, e.device)
        prob_sums = map_chunks(assign, H, rows, e.device) if assign_noise != "none" or with_usage else []
        slot = pool_slots(z, mask, W)
        clusters, size = pool_means(e, slot, W)  # (H, N, W, D), (H, N, W) eq. 9-10
        # Real behaviors of the batch, needed by the usage term only; a tensor, as reading it on the host
        # would wait for a GPU. Exact in float32 below 2^24 behaviors, as float(int(...)) was.
        if with_usage:
            n_real: Tensor | None = mask.sum().clamp(min=1).to(e.dtype)
            # With usage every chunk returned its (N, W) sum; the filter only tells the type checker so.
            mean_prob = torch.stack([p for p in prob_sums if p is not None]).sum(dim=0) / n_real
        else:
            n_real, mean_prob = None, e.new_zeros(0)
        ctx.save_for_backward(e, folded, mask, slot, size, clusters)
        ctx.options = (tau, assign_noise, tau_placement, centred, with_usage, seed, n_real)
        ctx.mark_non_differentiable(size)
        return clusters, size, mean_prob

    @staticmethod
    @once_differentiable  # the straight-through gradient is not differentiated again; runs under no_grad
    def backward(  # type: ignore[override]
        ctx: _QuantizeContext,
        d_clusters: Tensor | None,
        _d_size: Tensor | None,
        d_mean: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        e, folded, mask, slot, size, clusters = ctx.saved_tensors
        tau, assign_noise, tau_placement, centred, with_usage, seed, n_real = ctx.options
        H, L, _ = e.shape
        N, W, D = folded.shape
        f = folded.reshape(N * W, D)
        if d_clusters is None:
            d_clusters = torch.zeros_like(clusters)
        G = d_clusters / size.clamp(min=1.0).unsqueeze(-1)  # (H, N, W, D) dL/dsummed
        # Pooling: de_l = sum over codebooks of G at the behavior's codeword; padding reads the zero dump slot.
        # embedding_bag gathers and sums the N rows in one pass, without an (H, N, L, D) intermediate.
        G_slots = torch.cat([G.reshape(H * N * W, D), G.new_zeros(1, D)])  # (H N W + 1, D)
        bags = slot.transpose(1, 2).reshape(H * L, N)  # (H L, N)
        de = nn.functional.embedding_bag(bags, G_slots, mode="sum").view(H, L, D)  # (H, L, D)
        G = G.reshape(H, N * W, D)
        # dp_lk = scale_l (G_k · e_l - const_k): one bmm of [scale e, -scale] with [G, const], where scale_l
        # is 1 / tau at real behaviors and 0 at padding (real behaviors only; dt/ds = 1 / tau for every
        # placement; the softmax backward is linear in dp, so scaling dp first scales ds), and const_k
        # collects what does not depend on e_l: G_k · r_k (centred) minus dL/dmean_prob_k / n_real (usage).
        const = (G * clusters.reshape(H, N * W, D)).sum(dim=-1) if centred else None  # (H, N W)
        if with_usage and d_mean is not None:
            assert n_real is not None  # forward sets it with usage
            usage = d_mean.reshape(1, N * W) / n_real
            const = -usage.expand(H, -1) if const is None else const - usage
        if const is not None:
            G = torch.cat([G, const.unsqueeze(-1)], dim=-1)  # (H, N W, D + 1)
        scale = (mask.to(e.dtype) / tau).unsqueeze(-1)  # (H, L, 1)

        def grad(h0: int, h1: int) -> Tensor:
            e_c = e[h0:h1]  # (rows, L, D)
            s = (e_c @ f.T).unflatten(-1, (N, W))  # (rows, L, N, W) recomputed
            gumbel = None if assign_noise == "none" else fill_gumbel(torch.empty_like(s), seed, h0)
            p = noisy_logits(s, gumbel, tau, tau_placement).softmax(dim=-1)  # (rows, L, N, W) eq. 6
            x = e_c if const is None else torch.cat([e_c, -torch.ones_like(e_c[..., :1])], dim=-1)
            dp = torch.bmm(x * scale[h0:h1], G[h0:h1].transpose(1, 2)).unflatten(-1, (N, W))  # (rows, L, N, W)
            pd = dp.mul_(p)  # softmax backward: ds = p dp - p (sum_k p dp)
            ds = pd.addcmul_(p, pd.sum(dim=-1, keepdim=True), value=-1.0).view(h1 - h0, L, N * W)
            de[h0:h1] += ds @ f
            return ds.reshape(-1, N * W).T @ e_c.reshape(-1, D)  # (N W, D) this chunk's part of dfolded

        d_folded = torch.stack(map_chunks(grad, H, chunk_rows(L, N * W, e.device), e.device)).sum(dim=0)  # (N W, D)
        return de, d_folded.view(N, W, D), None, None, None, None, None, None, None
