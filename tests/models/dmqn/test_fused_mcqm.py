"""The fused MCQM path (dmqn_core.models.dmqn.fused_mcqm) against the reference path, for every quantizer option.

Both paths draw the same Gumbel noise under the same torch.manual_seed (one seed per forward, each
history's noise from its own generator), so they must agree in the assignment exactly and in values
and gradients up to float32 rounding: they add the same terms in a different order (chunked matmuls,
scatter-add instead of a one-hot matmul, the straight-through terms summed per codeword instead of
through autograd). float32 has eps = 1.2e-7; a sum of K terms reordered differs by at most about
K eps times its largest term, and the longest sums here have K <= H L W = 455 terms, but rounding
errors of reordered sums add like a random walk, about sqrt(K) eps ~ 3e-6 relative to the largest
value; we allow 1e-5 of the largest magnitude (the issue's bound). In float64 the same comparison
must hold to 1e-10, which no sign or factor error could pass.
"""

import itertools

import pytest
import torch

from dmqn_core.models.dmqn import fused_mcqm
from dmqn_core.models.dmqn.mcqm import MultiCodebookQuantizer

OPTIONS = list(
    itertools.product(("gumbel", "none"), ("after_noise", "before_noise"), ("plain", "centred"), (False, True))
)
# History lengths with padding, an empty history and a single behavior.
LENGTHS = (13, 7, 0, 1, 10)


def run(q: MultiCodebookQuantizer, e: torch.Tensor, mask: torch.Tensor, with_usage: bool, fused: bool) -> dict:
    """One training forward (seeded) and backward of a random linear loss; values and gradients."""
    q.fused = fused
    q.zero_grad()
    e = e.detach().clone().requires_grad_(True)
    torch.manual_seed(11)
    out = q(e, mask, with_usage=with_usage)
    generator = torch.Generator().manual_seed(12)  # on the CPU: the same loss on every device
    loss = (out.clusters * torch.randn(out.clusters.shape, generator=generator, dtype=e.dtype).to(e.device)).sum()
    if with_usage:
        weights = torch.randn(out.mean_prob.shape, generator=generator, dtype=e.dtype).to(e.device)
        loss = loss + (out.mean_prob * weights).sum()
    loss.backward()
    return {
        "clusters": out.clusters.detach(),
        "cluster_mask": out.cluster_mask,
        "cluster_size": out.cluster_size,
        "mean_prob": None if out.mean_prob is None else out.mean_prob.detach(),
        "e.grad": e.grad,
        "codebooks.grad": q.codebooks.grad.clone(),
        "proj.grad": q.proj.grad.clone(),
    }


def quantizer_and_inputs(
    assign_noise: str,
    tau_placement: str,
    straight_through: str,
    codebook_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
) -> tuple[MultiCodebookQuantizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    N, D = 3, 6
    q = MultiCodebookQuantizer(
        N, codebook_size, D, tau=0.6, assign_noise=assign_noise, tau_placement=tau_placement,
        straight_through=straight_through,
    ).to(dtype).train()  # fmt: skip
    L = max(LENGTHS)
    mask = torch.arange(L)[None] < torch.tensor(LENGTHS)[:, None]  # (H, L)
    e = torch.randn(len(LENGTHS), L, D, dtype=dtype) * mask[..., None]  # zero at padding, as the contract says
    return q.to(device), e.to(device), mask.to(device)


def assert_same(fused: dict, reference: dict, relative: float) -> None:
    assert torch.equal(fused["cluster_size"], reference["cluster_size"])
    assert torch.equal(fused["cluster_mask"], reference["cluster_mask"])
    assert (fused["mean_prob"] is None) == (reference["mean_prob"] is None)
    for name in ("clusters", "mean_prob", "e.grad", "codebooks.grad", "proj.grad"):
        if reference[name] is None:
            continue
        scale = max(1.0, reference[name].abs().max().item())
        torch.testing.assert_close(fused[name], reference[name], rtol=relative, atol=relative * scale, msg=name)


@pytest.mark.parametrize("chunk_elements", [100, fused_mcqm.CHUNK_ELEMENTS])  # 1 history per chunk, or all
@pytest.mark.parametrize(("assign_noise", "tau_placement", "straight_through", "with_usage"), OPTIONS)
def test_fused_training_path_equals_the_reference(
    monkeypatch: pytest.MonkeyPatch,
    assign_noise: str,
    tau_placement: str,
    straight_through: str,
    with_usage: bool,
    chunk_elements: int,
):
    monkeypatch.setattr(fused_mcqm, "CHUNK_ELEMENTS", chunk_elements)
    q, e, mask = quantizer_and_inputs(assign_noise, tau_placement, straight_through, 7, torch.float32)
    fused, reference = run(q, e, mask, with_usage, True), run(q, e, mask, with_usage, False)
    assert_same(fused, reference, 1e-5)
    # Empty codewords exist (W = 7 codewords, at most 13 behaviors), and empty histories have no cluster.
    assert not fused["cluster_mask"].all() and not fused["cluster_mask"][2].any()
    assert fused["e.grad"][mask.logical_not()].abs().max() == 0  # padding receives no gradient
    assert fused["codebooks.grad"].abs().sum() > 0 and fused["proj.grad"].abs().sum() > 0


@pytest.mark.parametrize(("assign_noise", "tau_placement", "straight_through", "with_usage"), OPTIONS)
def test_fused_training_path_equals_the_reference_in_float64(
    monkeypatch: pytest.MonkeyPatch, assign_noise: str, tau_placement: str, straight_through: str, with_usage: bool
):
    monkeypatch.setattr(fused_mcqm, "CHUNK_ELEMENTS", 200)  # chunks of 2, 2 and 1 histories
    q, e, mask = quantizer_and_inputs(assign_noise, tau_placement, straight_through, 5, torch.float64)
    assert_same(run(q, e, mask, with_usage, True), run(q, e, mask, with_usage, False), 1e-10)


@pytest.mark.parametrize("straight_through", ["plain", "centred"])
def test_a_single_codeword_pools_everything_and_gets_no_assignment_gradient(straight_through: str):
    """W = 1: the softmax is constantly 1, so the straight-through gradient into the codebooks is exactly 0."""
    q, e, mask = quantizer_and_inputs("gumbel", "after_noise", straight_through, 1, torch.float32)
    fused, reference = run(q, e, mask, True, True), run(q, e, mask, True, False)
    assert_same(fused, reference, 1e-5)
    assert fused["cluster_size"][:, :, 0].tolist() == [[n] * 3 for n in LENGTHS]
    assert fused["codebooks.grad"].abs().max() == 0 and fused["proj.grad"].abs().max() == 0


def test_the_noise_is_reproducible_and_independent_of_the_chunking(monkeypatch: pytest.MonkeyPatch):
    q, e, mask = quantizer_and_inputs("gumbel", "before_noise", "plain", 7, torch.float32)
    whole = run(q, e, mask, True, True)
    monkeypatch.setattr(fused_mcqm, "CHUNK_ELEMENTS", 1)
    per_history = run(q, e, mask, True, True)
    assert torch.equal(whole["cluster_size"], per_history["cluster_size"])
    torch.testing.assert_close(whole["e.grad"], per_history["e.grad"])
    torch.manual_seed(3)
    other = q(e, mask).cluster_size  # another seed draws other codewords
    assert not torch.equal(other, whole["cluster_size"])


def test_eval_path_equals_the_one_hot_reference():
    """Inference: argmax and scatter-add pooling == the one-hot matmul of the same argmax (eq. 7-10)."""
    q, e, mask = quantizer_and_inputs("gumbel", "after_noise", "plain", 7, torch.float32)
    q.eval()
    out = q(e, mask)
    scores = q.scores(e)  # (H, L, N, W)
    hard = torch.zeros_like(scores).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0) * mask[..., None, None]
    H, L, N, W = hard.shape
    size = hard.sum(dim=1)  # (H, N, W)
    summed = (hard.reshape(H, L, N * W).transpose(1, 2) @ e).unflatten(1, (N, W))  # (H, N, W, D)
    assert torch.equal(out.cluster_size, size)
    assert torch.equal(out.cluster_mask, size > 0)
    torch.testing.assert_close(out.clusters, summed / size.clamp(min=1).unsqueeze(-1), rtol=1e-5, atol=1e-6)
    assert out.mean_prob is None
    assert torch.equal(q.assign(e, mask), scores.argmax(-1).transpose(1, 2).masked_fill(~mask[:, None], -1))


def test_the_noise_is_gumbel_and_the_same_on_any_number_of_threads(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fused_mcqm, "NOISE_BLOCK", 1000)  # several generators per history
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_mcqm.fill_gumbel(torch.empty(3, 50, 4, 25), seed=7, first_row=2)
        torch.set_num_threads(2)
        two = fused_mcqm.fill_gumbel(torch.empty(3, 50, 4, 25), seed=7, first_row=2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    # Row r of a call starting at first_row is history first_row + r, whatever the call's first row.
    assert torch.equal(one[1:], fused_mcqm.fill_gumbel(torch.empty(2, 50, 4, 25), seed=7, first_row=3))
    # Gumbel(0, 1): mean = Euler's gamma 0.5772, std = pi / sqrt(6) = 1.2825; 15,000 draws, so the
    # standard error of the mean is 0.0105 and 5 of them is 0.052.
    assert abs(one.mean().item() - 0.5772) < 0.052
    assert abs(one.std().item() - 1.2825) < 0.05


def test_chunks_on_two_threads_give_what_one_thread_gives(monkeypatch: pytest.MonkeyPatch):
    """map_chunks runs chunks on Python threads with torch single-threaded inside; the results are the same."""
    monkeypatch.setattr(fused_mcqm, "CHUNK_ELEMENTS", 300)  # one history per chunk
    q, e, mask = quantizer_and_inputs("gumbel", "after_noise", "centred", 7, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, e, mask, True, True)
        torch.set_num_threads(2)
        two = run(q, e, mask, True, True)
        assert torch.get_num_threads() == 2  # restored after the chunks
        with torch.inference_mode():
            q.eval()
            assert torch.equal(q(e, mask).cluster_size, q.train(False)(e, mask).cluster_size)
    finally:
        torch.set_num_threads(threads)
    assert_same(two, one, 1e-6)


@pytest.mark.parametrize("codebook_size", [1, 5, 32, 300])  # 300: ranks beyond 8 bits
def test_argmax_codewords_takes_the_first_maximal_codeword(monkeypatch: pytest.MonkeyPatch, codebook_size: int):
    """Small integer embeddings and codewords make every score exact in float32 and ties frequent."""
    monkeypatch.setattr(fused_mcqm, "CHUNK_ELEMENTS", 2000)  # several chunks
    generator = torch.Generator().manual_seed(5)
    e = torch.randint(-2, 3, (6, 40, 4), generator=generator).float()
    folded = torch.randint(-1, 2, (3, codebook_size, 4), generator=generator).float()
    scores = torch.einsum("hld,nwd->hnlw", e.double(), folded.double())  # (H, N, L, W), exact
    z = fused_mcqm.argmax_codewords(e, folded)
    assert torch.equal(z, scores.argmax(dim=-1))  # torch's argmax returns the first maximal index
    if codebook_size > 1:
        assert (scores == scores.amax(dim=-1, keepdim=True)).sum(dim=-1).max() > 1  # ties were there to break
    e[0, 3, 0] = float("nan")
    assert fused_mcqm.argmax_codewords(e, folded).max() < codebook_size  # a NaN score still gives a codeword


@pytest.mark.cuda
@pytest.mark.parametrize("chunk_elements", [100, fused_mcqm.CUDA_CHUNK_ELEMENTS])  # 1 history per chunk, or all
@pytest.mark.parametrize(("assign_noise", "tau_placement", "straight_through", "with_usage"), OPTIONS)
def test_fused_training_path_equals_the_reference_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
    assign_noise: str,
    tau_placement: str,
    straight_through: str,
    with_usage: bool,
    chunk_elements: int,
):
    """The CPU test above on the GPU: there both paths draw their noise from torch's CUDA generators (one per
    history and block, seeded alike) and the chunks run one after the other; the same float32 bound (1e-5 of
    the largest magnitude, for reordered sums of at most 455 terms) and the float64 bound 1e-10."""
    monkeypatch.setattr(fused_mcqm, "CUDA_CHUNK_ELEMENTS", chunk_elements)
    for dtype, relative in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        q, e, mask = quantizer_and_inputs(assign_noise, tau_placement, straight_through, 7, dtype, "cuda")
        fused, reference = run(q, e, mask, with_usage, True), run(q, e, mask, with_usage, False)
        assert_same(fused, reference, relative)
        assert fused["e.grad"][mask.logical_not()].abs().max() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("straight_through", ["plain", "centred"])
def test_the_fused_path_on_cuda_equals_the_cpu(monkeypatch: pytest.MonkeyPatch, straight_through: str):
    """Without noise (the default: CPU and CUDA draw Gumbel noise from different generators) the fused path gives
    the CPU's values and gradients. In float64, 1e-10: no float32 near-tie can make the devices' argmax differ.
    On the GPU no chunk goes to the thread pool and torch's CPU threads are left alone."""
    monkeypatch.setattr(fused_mcqm, "CHUNK_ELEMENTS", 300)  # several chunks on the CPU, on both threads
    for with_usage in (False, True):
        cpu = run(*quantizer_and_inputs("none", "after_noise", straight_through, 7, torch.float64), with_usage, True)
        with monkeypatch.context() as cpu_only:

            def refuse(*args: object) -> None:
                raise AssertionError("the CUDA path used the CPU's thread pool or set torch's threads")

            cpu_only.setattr(fused_mcqm, "_threads", refuse)
            cpu_only.setattr(torch, "set_num_threads", refuse)
            q, e, mask = quantizer_and_inputs("none", "after_noise", straight_through, 7, torch.float64, "cuda")
            cuda = run(q, e, mask, with_usage, True)
        assert_same({k: None if v is None else v.cpu() for k, v in cuda.items()}, cpu, 1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("codebook_size", [1, 5, 32, 300])
def test_argmax_codewords_takes_the_first_maximal_codeword_on_cuda(codebook_size: int):
    """The float trick of argmax_codewords (s - max >= 0 times a rank, then amax) on the GPU: exact scores of
    small integers, frequent ties, the first maximal codeword as torch's argmax; a NaN still gives a codeword."""
    generator = torch.Generator().manual_seed(5)
    e = torch.randint(-2, 3, (6, 40, 4), generator=generator).float()
    folded = torch.randint(-1, 2, (3, codebook_size, 4), generator=generator).float()
    scores = torch.einsum("hld,nwd->hnlw", e.double(), folded.double())  # (H, N, L, W), exact
    assert torch.equal(fused_mcqm.argmax_codewords(e.cuda(), folded.cuda()).cpu(), scores.argmax(dim=-1))
    e[0, 3, 0] = float("nan")
    assert fused_mcqm.argmax_codewords(e.cuda(), folded.cuda()).max() < codebook_size
