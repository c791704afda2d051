"""The CUDA path (docs/gpu.md): the same training step, runs, exported states and scores as on the CPU, bf16
autocast, and torchrun with NCCL. Every test is marked cuda: skipped with the reason where torch sees no GPU,
run on a GPU machine by `pytest -m cuda`.

How close the devices must agree: float32 has eps = 1.2e-7. A gradient entry here sums at most
B L = 16 x 50 = 800 products through about ten layers, and the GPU adds them in another order (cuBLAS
tiles, atomic adds of embedding_bag and index_add): reordered sums differ by about sqrt(K) eps ~ 3.4e-6 of
their largest term per layer, some 3e-5 after ten, so we allow 1e-4 of the tensor's largest magnitude.
TF32 is switched off, or matmuls would round to 10 bits (1e-3). In float64 the bound is 1e-10.

DMQN assigns each behavior to its best-scoring codeword (an argmax): where two scores lie within float32
rounding of each other the devices may pick different codewords, a discontinuity no tolerance covers. Its
training step is therefore compared in float64, and the exported float32 states user by user, after
checking that every codeword the devices assign differently is such a near-tie.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmqn_core.data.batches import Batch, BatchLoader, gather_histories
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.devices import autocast
from dmqn_core.errors import DmqnError
from dmqn_core.models.registry import build_model, model_names
from dmqn_core.runs.run import Run
from dmqn_core.runs.store import RunStore
from dmqn_core.serving.cache import CachedScorer, export_states, model_version
from dmqn_core.serving.state_codec import decode_state
from dmqn_core.serving.state_store import EmbeddedStateStore
from dmqn_core.training.evaluate import evaluate_run
from dmqn_core.training.train import resolve_configs, train
from dmqn_core.workspace import Workspace

pytestmark = pytest.mark.cuda

MODEL = {"embed_dim": 8, "mlp_hidden": [16], "n_codebooks": 2, "codebook_size": 8}
TRAIN = {"epochs": 1, "max_len": 50, "batch_size": 64, "seed": 5, "inspect_users": 10}
LR = 1e-3


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """Full float32 matmuls and convolutions on the GPU, as on the CPU (the tolerances assume them)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fresh_workspace(tiny_workspace: Workspace, path: Path) -> Workspace:
    ws = Workspace(path).ensure()
    shutil.copytree(tiny_workspace.dataset_path("tiny"), ws.dataset_path("tiny"))
    return ws


def first_batch(data: PreparedSet, batch_size: int = 16, max_len: int = 50) -> Batch:
    return next(iter(BatchLoader(data, "train", batch_size, max_len, shuffle=True, seed=0)))


def one_step(model: torch.nn.Module, batch: Batch, device: str, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """What Trainer.train_epoch does with one batch on ``device``: loss, the gradients and the weights after Adam."""
    model = copy.deepcopy(model).to(device).train()
    dtype = next(model.parameters()).dtype
    batch = batch.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    with autocast(torch.device(device), precision):
        logits = model(**batch.model_inputs())
        loss = F.binary_cross_entropy_with_logits(logits, batch.label.to(dtype)) + model.auxiliary_loss()
    loss.backward()
    out = {"loss": loss.detach().float().cpu(), "logits": logits.detach().float().cpu()}
    out.update({f"grad {name}": p.grad.detach().cpu() for name, p in model.named_parameters()})
    optimizer.step()
    out.update({f"after {name}": p.detach().cpu() for name, p in model.named_parameters()})
    return out


def assert_steps_agree(cpu: dict[str, torch.Tensor], cuda: dict[str, torch.Tensor], relative: float) -> None:
    for name, expected in cpu.items():
        if name.startswith("after "):
            continue
        scale = max(float(expected.abs().max()), 1e-30)
        torch.testing.assert_close(cuda[name], expected, rtol=relative, atol=relative * scale, msg=name)
    for name, expected in cpu.items():
        if not name.startswith("after "):
            continue
        # Adam's first step moves a weight by about lr * g / (|g| + 1e-8): where |g| is within the gradient's
        # rounding (relative x its largest entry) the step's size and sign are rounding too. Elsewhere the
        # two steps agree to a few times the gradients' relative error.
        grad = cpu["grad " + name[len("after ") :]]
        determined = grad.abs() > 100 * relative * max(float(grad.abs().max()), 1e-30)
        torch.testing.assert_close(
            cuda[name][determined], expected[determined], rtol=0, atol=10 * relative * LR, msg=name
        )


@pytest.mark.parametrize(
    ("model_name", "dtype", "relative"),
    [("din-full", torch.float32, 1e-4), ("dsin", torch.float32, 1e-4), ("dmqn", torch.float64, 1e-10)],
)
def test_one_training_step_on_cuda_equals_the_cpu(tiny_workspace, model_name, dtype, relative):
    """The same weights and batch give the CPU's loss, gradients and Adam step. DIEN and dropout draw random
    numbers on the device (other generators on the GPU), SIM, ETA and TWIN take a top-k: not compared here."""
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    model_config, _ = resolve_configs(data, MODEL, {"device": "cpu"})
    torch.manual_seed(0)
    model = build_model(model_name, model_config, item_popularity=data.item_popularity).to(dtype)
    batch = first_batch(data)
    assert_steps_agree(one_step(model, batch, "cpu"), one_step(model, batch, "cuda"), relative)


@pytest.mark.parametrize("model_name", [m for m in model_names() if m != "pop"])
def test_every_model_trains_a_step_under_bf16_autocast(tiny_workspace, model_name):
    """bf16 keeps 8 bits of mantissa (relative 4e-3 a rounding): the loss (about 0.69) within 0.03 of fp32's
    and every gradient finite."""
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    model_config, _ = resolve_configs(data, MODEL, {"device": "cpu"})
    torch.manual_seed(0)
    model = build_model(model_name, model_config, item_popularity=data.item_popularity)
    batch = first_batch(data)
    torch.manual_seed(1)
    fp32 = one_step(model, batch, "cuda")
    torch.manual_seed(1)
    bf16 = one_step(model, batch, "cuda", "bf16")
    assert abs(float(bf16["loss"]) - float(fp32["loss"])) < 0.03
    assert all(torch.isfinite(value).all() for value in bf16.values())


def test_auto_trains_on_cuda_records_it_and_resumes_there(tiny_workspace, tmp_path):
    ws = fresh_workspace(tiny_workspace, tmp_path / "ws")
    settings = {**TRAIN, "epochs": 2, "patience": 5}
    whole = train(ws, "tiny", "din-full", MODEL, settings)
    assert whole.device == f"cuda:{torch.cuda.current_device()}" and whole.precision == "fp32"
    run = Run.open(ws, whole.run_id)
    assert run.train_settings["device"] == "cuda" and run.train_settings["precision"] == "fp32"
    checkpoint = torch.load(run.directory / "checkpoint.pt", weights_only=True)
    assert checkpoint["cuda_rng"].dtype == torch.uint8  # the GPU's generator is saved with the run

    # Stopped after its first epoch and resumed, the run continues on the GPU it recorded and ends close to
    # the uninterrupted one (the GPU's atomic adds make the last bits differ from launch to launch).
    stopped = train(ws, "tiny", "din-full", MODEL, settings, on_epoch=lambda epoch, valid: True)
    RunStore(ws.store_path).finish_run(stopped.run_id, "interrupted", error="stopped by the test")
    resumed = train(ws, resume=stopped.run_id)
    assert resumed.device == whole.device and len(resumed.history) == 2
    for a, b in zip(resumed.history, whole.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["valid_auc"] == pytest.approx(b["valid_auc"], abs=1e-3)


def test_bf16_training_and_evaluation(tiny_workspace, tmp_path):
    ws = fresh_workspace(tiny_workspace, tmp_path / "ws")
    result = train(ws, "tiny", "din-full", MODEL, {**TRAIN, "precision": "bf16"})
    assert result.precision == "bf16" and np.isfinite(result.test["logloss"])
    assert Run.open(ws, result.run_id).train_settings["precision"] == "bf16"
    # Evaluation is fp32 unless asked: bf16 evaluation is close to it, and reproduces the run's test AUC only roughly.
    _, fp32 = evaluate_run(ws, result.run_id, "test")
    _, bf16 = evaluate_run(ws, result.run_id, "test", precision="bf16")
    assert fp32["auc"] == pytest.approx(result.test["auc"], abs=1e-6)
    assert bf16["auc"] == pytest.approx(fp32["auc"], abs=0.02)
    with pytest.raises(DmqnError, match="bf16 needs a CUDA device"):
        evaluate_run(ws, result.run_id, "test", device="cpu", precision="bf16")


def near_ties(model: torch.nn.Module, histories: list[torch.Tensor], bound: float) -> torch.Tensor:
    """(H, N, L) bool: where the best two codeword scores (computed in float64 on the CPU) differ by less than
    ``bound`` of the largest score magnitude, i.e. where float32 rounding may choose either."""
    item, category, behavior, mask = histories
    model = copy.deepcopy(model).cpu().double()
    with torch.no_grad():
        e = model.embedding.behaviors(item, category, behavior, mask)
        scores = model.quantizer.scores(e)  # (H, L, N, W)
    top = scores.topk(2, dim=-1).values
    gap = (top[..., 0] - top[..., 1]).transpose(1, 2)  # (H, N, L)
    return gap < bound * float(scores.abs().max())


def test_exported_states_and_scores_on_cuda_equal_the_cpu(tiny_workspace, tmp_path):
    ws = fresh_workspace(tiny_workspace, tmp_path / "ws")
    run_id = train(ws, "tiny", "dmqn", MODEL, {**TRAIN, "device": "cpu"}).run_id
    files = {device: tmp_path / f"{device}.sqlite" for device in ("cpu", "cuda")}
    for device, file in files.items():
        export_states(ws, run_id, to=str(file), device=device)
    run = Run.open(ws, run_id)
    data, model = run.data, run.model("cpu")
    users = np.arange(1, data.n_users + 1, dtype=np.int64)
    item, category, behavior, _, mask = gather_histories(data, users, data.user_offsets[users], run.max_len)
    hist = [torch.from_numpy(a) for a in (item, category, behavior, mask)]
    with torch.no_grad():
        on_cpu = model.codeword_assignments(*hist)
        on_cuda = run.model("cuda").codeword_assignments(*(t.cuda() for t in hist)).cpu()
    differ = on_cpu != on_cuda  # (H, N, L)
    # float32 scores of D = 8 terms differ between the devices by about 1e-6 of the largest at most.
    assert not (differ & ~near_ties(model, hist, 1e-5)).any(), "the devices chose different codewords off a near-tie"
    same = ~differ.flatten(1).any(dim=1)  # (H,) users whose every behavior has the same codeword on both
    assert same.float().mean() > 0.9  # the comparison below covers most users

    version = model_version(run.run_id, run.best_path)
    raw = data.raw_user(users).tolist()
    stores = [EmbeddedStateStore(files["cpu"]), EmbeddedStateStore(files["cuda"])]
    try:
        values = [store.get(version, raw) for store in stores]
    finally:
        for store in stores:
            store.close()
    for user, keep in zip(raw, same.tolist()):
        if not keep:
            continue
        x, y = decode_state(values[0][user]), decode_state(values[1][user])
        # The recent mean and ICIM's cluster tokens: a few float32 layers, the bound of the training step.
        np.testing.assert_allclose(y.recent, x.recent, rtol=1e-4, atol=1e-5)
        for n in range(len(x.codewords)):
            np.testing.assert_array_equal(y.codewords[n], x.codewords[n])
            np.testing.assert_array_equal(y.sizes[n], x.sizes[n])
        for cx, cy in zip(x.tokens, y.tokens):
            np.testing.assert_allclose(cy, cx, rtol=1e-4, atol=1e-4 * max(float(np.abs(cx).max(initial=0.0)), 1e-6))

    # Scores from the same stored states: CTAM + MLP on the GPU give the CPU's probabilities (float32 sums of
    # at most a few hundred terms: 1e-5).
    items = data.raw_item(np.arange(1, 21)).tolist()
    user = raw[int(np.flatnonzero(same.numpy())[0])]
    with (
        CachedScorer(ws, run_id, str(files["cpu"]), device="cpu") as on_cpu_scorer,
        CachedScorer(ws, run_id, str(files["cpu"]), device="cuda") as on_cuda_scorer,
    ):
        assert on_cuda_scorer.model.quantizer.codebooks.is_cuda
        np.testing.assert_allclose(
            on_cuda_scorer.score(user, items), on_cpu_scorer.score(user, items), rtol=1e-5, atol=1e-6
        )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torchrun_with_nccl_trains_as_one_process_does(tiny_workspace, tmp_path):
    """Two processes on two GPUs, gradients over NCCL: the run's metrics as one GPU process gives them, within
    what the GPUs' reordered float32 sums (and the gradients' all-reduce) move an AUC over one epoch."""
    ws = fresh_workspace(tiny_workspace, tmp_path / "two")
    config = tmp_path / "small.toml"
    config.write_text(
        "[model]\nembed_dim = 8\nmlp_hidden = [16]\n[train]\n" + "".join(f"{k} = {v}\n" for k, v in TRAIN.items())
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dmqn_cli",
         "train", "tiny", "--model", "din-full", "--config", str(config), "--workspace", str(ws.root)],
        env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = launch.communicate(timeout=600)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
    assert launch.returncode == 0, stdout + stderr
    (record,) = RunStore(ws.store_path).list_runs()
    params = record.params
    assert params["distributed"] == {"world_size": 2, "backend": "nccl"} and params["train"]["device"] == "cuda"
    reference = train(fresh_workspace(tiny_workspace, tmp_path / "one"), "tiny", "din-full", MODEL, TRAIN)
    assert record.test_auc == pytest.approx(reference.test["auc"], abs=2e-3)
