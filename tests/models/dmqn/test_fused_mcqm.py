"""The fused MCQM path (fused_mcqm.py) against MCQM's independent reference (mcqm_reference.py), for every option.

The two share no function: the reference applies the projection as eq. 4 writes it, pools with a
one-hot einsum and takes every gradient from autograd; the fused path folds the projection into the
codebooks, pools by scatter-add and writes its backward out. Compared: the forward values and the
gradients with respect to the embeddings, the codebooks and the projections, for each combination of
assign_noise, tau_placement, straight_through and the usage loss, at several shapes, with padding (it
holds random values here, so that it is ignored by construction and not because it is zero), empty
histories, single behaviors and empty codewords (the random loss weighs every codeword, so an empty
codeword's straight-through gradient is compared too).

Noise: the reference draws none, it is handed the noise. The fused forward draws one seed
(draw_seed, from the global generator, seeded here) and then history h's noise from
fill_gumbel(seed, h), chunk by chunk and again in the backward; the reference gets fill_gumbel(seed)
over the whole batch, the same numbers (test_the_noise_is_gumbel_and_the_same_on_any_number_of_threads
checks that a history's noise depends on the seed and its row only).

Tolerance: the two compute the same real function and differ by rounding only, their sums taken in
other orders and the score associated otherwise ((e W_2) c^T against e (c W_2^T)^T). To first order a
sum of K terms in any order is within K u of the sum of its terms' magnitudes (Higham, Accuracy and
Stability of Numerical Algorithms, section 3.1), u the unit roundoff (2^-24 in float32, 2^-53 in
float64). The deepest chain is the codebooks' gradient, a sum over the batch's H L behaviors whose terms
come after the softmax backward (W terms), dp = G . e (D terms) and the score through the projection
(2 D terms): K = H L + W + 3 D. We allow K u of each tensor's largest magnitude (a test cannot see each
entry's sum of magnitudes; they are of that order here): 2.4e-6 to 1.7e-5 in float32 at the shapes below.
Measured, the two paths differ by at most a quarter of that at every shape, and each lies within 1.5e-6
of a float64 run. A wrong sign, factor, mask or temperature in the reference, or a 1e-4 error in its
scores, fails these tests (tried, not kept).
"""

import itertools

import pytest
import torch

from dmqn_core.models.dmqn import fused_mcqm, mcqm_reference
from dmqn_core.models.dmqn.fused_mcqm import draw_seed, fill_gumbel
from dmqn_core.models.dmqn.mcqm import MultiCodebookQuantizer

OPTIONS = list(
    itertools.product(("gumbel", "none"), ("after_noise", "before_noise"), ("plain", "centred"), (False, True))
)
# (N, W, D, history lengths). Every shape has padding and empty codewords.
SHAPES = {
    # an empty history and a single behavior
    "padded": (3, 7, 6, (13, 7, 0, 1, 10)),
    # more codewords than a short history has behaviors
    "wide": (2, 16, 8, (40, 25, 3)),
    # two codewords: clusters of several behaviors, every codeword used in the longer histories
    "narrow": (4, 2, 5, (6, 0, 2, 5)),
    # one codebook, long histories
    "long": (1, 32, 16, (100, 64)),
}
NOISE_SEED = 11  # torch.manual_seed before each forward: the seed both paths' noise comes from


def quantizer_and_inputs(
    shape: tuple[int, int, int, tuple[int, ...]],
    options: tuple[str, str, str],
    dtype: torch.dtype,
    device: str = "cpu",
) -> tuple[MultiCodebookQuantizer, torch.Tensor, torch.Tensor]:
    N, W, D, lengths = shape
    assign_noise, tau_placement, straight_through = options
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(
        N, W, D, tau=0.6, assign_noise=assign_noise, tau_placement=tau_placement, straight_through=straight_through
    ).to(dtype).train()  # fmt: skip
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]  # (H, L)
    e = torch.randn(len(lengths), max(lengths), D, dtype=dtype)  # (H, L, D), random at padding too
    return q.to(device), e.to(device), mask.to(device)


def tolerance(e: torch.Tensor, q: MultiCodebookQuantizer) -> float:
    """K u, the bound of the module docstring, relative to a tensor's largest magnitude."""
    H, L, D = e.shape
    return (H * L + q.codebooks.shape[1] + 3 * D) * torch.finfo(e.dtype).eps / 2


def random_loss(clusters: torch.Tensor, mean_prob: torch.Tensor | None) -> torch.Tensor:
    """A random linear loss of the outputs, the same weights on every path and device (drawn on the CPU)."""
    generator = torch.Generator().manual_seed(12)
    weights = torch.randn(clusters.shape, generator=generator).to(clusters)
    loss = (clusters * weights).sum()
    if mean_prob is not None:
        loss = loss + (mean_prob * torch.randn(mean_prob.shape, generator=generator).to(mean_prob)).sum()
    return loss


def gradients(q: MultiCodebookQuantizer, e: torch.Tensor) -> dict:
    return {"e.grad": e.grad, "codebooks.grad": q.codebooks.grad.clone(), "proj.grad": q.proj.grad.clone()}


def run_fused(q: MultiCodebookQuantizer, e: torch.Tensor, mask: torch.Tensor, with_usage: bool) -> dict:
    """One training forward of the production quantizer and the backward of a random loss; values and gradients."""
    q.zero_grad()
    e = e.detach().clone().requires_grad_(True)
    torch.manual_seed(NOISE_SEED)
    out = q(e, mask, with_usage=with_usage)
    random_loss(out.clusters, out.mean_prob).backward()
    mean_prob = None if out.mean_prob is None else out.mean_prob.detach()
    values = {"clusters": out.clusters.detach(), "cluster_size": out.cluster_size, "mean_prob": mean_prob}
    return values | gradients(q, e)


def run_reference(q: MultiCodebookQuantizer, e: torch.Tensor, mask: torch.Tensor, with_usage: bool) -> dict:
    """run_fused through mcqm_reference, on q's parameters and the noise the fused forward draws."""
    q.zero_grad()
    e = e.detach().clone().requires_grad_(True)
    N, W, _ = q.codebooks.shape
    torch.manual_seed(NOISE_SEED)
    gumbel = None if q.assign_noise == "none" else fill_gumbel(e.new_empty(*mask.shape, N, W), draw_seed(), 0)
    out = mcqm_reference.quantize(
        e, mask, q.codebooks, q.proj, tau=q.tau, assign_noise=q.assign_noise, tau_placement=q.tau_placement,
        straight_through=q.straight_through, gumbel=gumbel,
    )  # fmt: skip
    mean_prob = out.mean_prob if with_usage else None
    random_loss(out.clusters, mean_prob).backward()
    values = {
        "clusters": out.clusters.detach(),
        "cluster_size": out.cluster_size,
        "mean_prob": None if mean_prob is None else mean_prob.detach(),
    }
    return values | gradients(q, e)


def assert_same(fused: dict, reference: dict, relative: float) -> None:
    """The same assignment exactly, every other tensor within `relative` of its largest magnitude."""
    assert torch.equal(fused["cluster_size"], reference["cluster_size"])
    assert (fused["mean_prob"] is None) == (reference["mean_prob"] is None)
    for name in ("clusters", "mean_prob", "e.grad", "codebooks.grad", "proj.grad"):
        if reference[name] is None:
            continue
        scale = reference[name].abs().max().item()
        torch.testing.assert_close(fused[name], reference[name], rtol=0.0, atol=relative * scale, msg=name)


@pytest.mark.parametrize("chunk_elements", [100, fused_mcqm.CHUNK_ELEMENTS])  # 1 history per chunk, or all
@pytest.mark.parametrize(("assign_noise", "tau_placement", "straight_through", "with_usage"), OPTIONS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fused_training_path_equals_the_reference(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple,
    assign_noise: str,
    tau_placement: str,
    straight_through: str,
    with_usage: bool,
    chunk_elements: int,
):
    monkeypatch.setattr(fused_mcqm, "CHUNK_ELEMENTS", chunk_elements)
    q, e, mask = quantizer_and_inputs(shape, (assign_noise, tau_placement, straight_through), torch.float32)
    fused, reference = run_fused(q, e, mask, with_usage), run_reference(q, e, mask, with_usage)
    assert_same(fused, reference, tolerance(e, q))
    size = fused["cluster_size"]
    assert (size == 0).any()  # empty codewords
    # Every real behavior in exactly one cluster per codebook, padding in none.
    assert torch.equal(size.sum(dim=-1), mask.sum(dim=-1, keepdim=True).expand(-1, q.codebooks.shape[0]).float())
    assert fused["e.grad"][~mask].abs().max() == 0  # padding receives no gradient, whatever it holds
    assert fused["codebooks.grad"].abs().sum() > 0 and fused["proj.grad"].abs().sum() > 0


@pytest.mark.parametrize(("assign_noise", "tau_placement", "straight_through", "with_usage"), OPTIONS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fused_training_path_equals_the_reference_in_float64(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple,
    assign_noise: str,
    tau_placement: str,
    straight_through: str,
    with_usage: bool,
):
    monkeypatch.setattr(fused_mcqm, "CHUNK_ELEMENTS", 200)  # chunks of a few histories, or one
    q, e, mask = quantizer_and_inputs(shape, (assign_noise, tau_placement, straight_through), torch.float64)
    assert_same(run_fused(q, e, mask, with_usage), run_reference(q, e, mask, with_usage), tolerance(e, q))


@pytest.mark.parametrize("straight_through", ["plain", "centred"])
def test_a_single_codeword_pools_everything_and_gets_no_assignment_gradient(straight_through: str):
    """W = 1: the softmax is constantly 1, so the straight-through gradient into the codebooks is exactly 0."""
    lengths = SHAPES["padded"][3]
    q, e, mask = quantizer_and_inputs((3, 1, 6, lengths), ("gumbel", "after_noise", straight_through), torch.float32)
    fused, reference = run_fused(q, e, mask, True), run_reference(q, e, mask, True)
    assert_same(fused, reference, tolerance(e, q))
    assert fused["cluster_size"][:, :, 0].tolist() == [[n] * 3 for n in lengths]
    assert fused["codebooks.grad"].abs().max() == 0 and fused["proj.grad"].abs().max() == 0


def test_the_noise_is_reproducible_and_independent_of_the_chunking(monkeypatch: pytest.MonkeyPatch):
    q, e, mask = quantizer_and_inputs(SHAPES["padded"], ("gumbel", "before_noise", "plain"), torch.float32)
    whole = run_fused(q, e, mask, True)
    monkeypatch.setattr(fused_mcqm, "CHUNK_ELEMENTS", 1)
    per_history = run_fused(q, e, mask, True)
    assert torch.equal(whole["cluster_size"], per_history["cluster_size"])
    torch.testing.assert_close(whole["e.grad"], per_history["e.grad"])
    torch.manual_seed(NOISE_SEED + 1)
    other = q(e, mask).cluster_size  # another seed draws other codewords
    assert not torch.equal(other, whole["cluster_size"])


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_eval_path_equals_the_reference_without_noise(shape: tuple):
    """Inference (argmax, scatter-add pooling) gives the values of the reference's noise-free training path."""
    q, e, mask = quantizer_and_inputs(shape, ("gumbel", "after_noise", "plain"), torch.float32)
    out = q.eval()(e, mask)
    reference = mcqm_reference.quantize(
        e, mask, q.codebooks, q.proj, tau=q.tau, assign_noise="none", tau_placement="after_noise",
        straight_through="plain",
    )  # fmt: skip
    assert torch.equal(out.cluster_size, reference.cluster_size)
    assert torch.equal(out.cluster_mask, reference.cluster_size > 0)
    clusters = reference.clusters.detach()
    torch.testing.assert_close(out.clusters, clusters, rtol=0.0, atol=tolerance(e, q) * clusters.abs().max().item())
    assert out.mean_prob is None
    # eq. 4-5 as written, then the first maximal codeword (eq. 7-8); -1 at padding.
    scores = torch.einsum("hld,nde,nwe->hnlw", e.double(), q.proj.double(), q.codebooks.double())  # (H, N, L, W)
    assert torch.equal(q.assign(e, mask), scores.argmax(-1).masked_fill(~mask[:, None], -1))


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
    q, e, mask = quantizer_and_inputs(SHAPES["padded"], ("gumbel", "after_noise", "centred"), torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_fused(q, e, mask, True)
        torch.set_num_threads(2)
        two = run_fused(q, e, mask, True)
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
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fused_training_path_equals_the_reference_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple,
    assign_noise: str,
    tau_placement: str,
    straight_through: str,
    with_usage: bool,
    chunk_elements: int,
):
    """The CPU tests above on the GPU, in float32 and float64: there fill_gumbel draws from torch's CUDA generators
    (one per history and block) and the chunks run one after the other; the same bound K u."""
    monkeypatch.setattr(fused_mcqm, "CUDA_CHUNK_ELEMENTS", chunk_elements)
    for dtype in (torch.float32, torch.float64):
        q, e, mask = quantizer_and_inputs(shape, (assign_noise, tau_placement, straight_through), dtype, "cuda")
        fused, reference = run_fused(q, e, mask, with_usage), run_reference(q, e, mask, with_usage)
        assert_same(fused, reference, tolerance(e, q))
        assert fused["e.grad"][~mask].abs().max() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("straight_through", ["plain", "centred"])
def test_the_fused_path_on_cuda_equals_the_cpu(monkeypatch: pytest.MonkeyPatch, straight_through: str):
    """Without noise (the default: CPU and CUDA draw Gumbel noise from different generators) the fused path gives
    the CPU's values and gradients. In float64, 1e-10: no float32 near-tie can make the devices' argmax differ.
    On the GPU no chunk goes to the thread pool and torch's CPU threads are left alone."""
    monkeypatch.setattr(fused_mcqm, "CHUNK_ELEMENTS", 300)  # several chunks on the CPU, on both threads
    options = ("none", "after_noise", straight_through)
    for with_usage in (False, True):
        cpu = run_fused(*quantizer_and_inputs(SHAPES["padded"], options, torch.float64), with_usage)
        with monkeypatch.context() as cpu_only:

            def refuse(*args: object) -> None:
                raise AssertionError("the CUDA path used the CPU's thread pool or set torch's threads")

            cpu_only.setattr(fused_mcqm, "_threads", refuse)
            cpu_only.setattr(torch, "set_num_threads", refuse)
            cuda = run_fused(*quantizer_and_inputs(SHAPES["padded"], options, torch.float64, "cuda"), with_usage)
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
