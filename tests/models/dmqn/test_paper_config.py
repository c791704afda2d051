"""examples/dmqn-paper.toml: the paper's plain DMQN, every project addition switched off."""

import shutil
from dataclasses import fields
from pathlib import Path

import torch
from model_batches import random_batch

from dmqn_core.config import ModelConfig
from dmqn_core.models.dmqn.model import DMQN
from dmqn_core.training.evaluate import evaluate_run
from dmqn_core.training.train import read_config_file, train
from dmqn_core.workspace import Workspace

PAPER_TOML = Path(__file__).parents[3] / "examples" / "dmqn-paper.toml"
# The switches of docs/model.md "The paper's plain model", each with its default and its paper value.
SWITCHES = {
    "ctam_size_bias": (True, False),
    "ctam_match_scalars": (True, False),
    "mlp_products": (True, False),
    "ctam_identity_init": (True, False),
    "embedding_init": ("scaled", "default"),
    "behavior_time": (True, False),
    "cluster_categories": (4, 0),
}
# MCQM as eq. 6-7 train it: the default ("none", chosen by validation AUC) differs from the paper here.
PAPER_ASSIGNMENT = {"assign_noise": ("none", "gumbel"), "tau_placement": ("after_noise", "after_noise")}
SMALL = {
    "n_items": 60,
    "n_categories": 8,
    "n_behavior_types": 4,
    "embed_dim": 8,
    "n_codebooks": 3,
    "match_features": False,  # the inputs every model shares are not the paper config's business
}


def paper_settings() -> dict:
    model_settings, train_settings = read_config_file(PAPER_TOML)
    assert train_settings == {}  # [model] keys only: everything else keeps its default
    return model_settings


def test_the_paper_toml_turns_every_switch_off_and_nothing_else():
    both = {**SWITCHES, **PAPER_ASSIGNMENT}
    assert paper_settings() == {key: off for key, (_, off) in both.items()}
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    assert {key: defaults[key] for key in both} == {key: on for key, (on, _) in both.items()}


def test_the_paper_model_is_built_plain():
    config = ModelConfig(**SMALL, **paper_settings())
    torch.manual_seed(0)
    m = DMQN(config).eval()
    K, D = config.n_codebooks, config.embed_dim
    # [c, K interests, the DIN short-term interest, recent]: the short term is an input every model shares
    assert m.head.n_scalars == 0 and m.head.net[0].in_features == D * (K + 3)
    assert not m.ctam.size_bias
    assert not torch.allclose(m.ctam.wq[0], m.ctam.wq[0].diagonal().mean() * torch.eye(D))
    assert abs(m.embedding.item.weight[1:].std().item() - 1.0) < 0.3  # N(0, 1), not 0.005
    b = random_batch(config)
    with torch.no_grad():
        logits = m(**b)
        state = m.encode_user(b["hist_item"], b["hist_category"], b["hist_behavior"], b["hist_mask"])
        split = m.score(state, b["cand_item"], b["cand_category"], b["hist_index"])
    assert torch.isfinite(logits).all() and (logits - split).abs().max() <= 1e-5


def test_the_paper_config_trains_one_tiny_epoch(tiny_workspace, tmp_path):
    ws = Workspace(tmp_path).ensure()  # a copy of the tiny set, so that the shared run store gets no run of ours
    shutil.copytree(tiny_workspace.dataset_path("tiny"), ws.dataset_path("tiny"))
    result = train(ws, "tiny", "dmqn", paper_settings(), {"epochs": 1, "max_len": 60, "inspect_users": 0, "seed": 0})
    assert result.best_epoch == 1 and len(result.history) == 1
    # Tested with its best (only) epoch's weights: evaluating the run again gives the same metrics.
    _, again = evaluate_run(ws, result.run_id, "test")
    assert again["auc"] == result.test["auc"] and result.test["logloss"] > 0
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


def test_the_ablation_configs_change_one_switch_each():
    """examples/ablation: plain.toml is the paper's model with the noise-free assignment; plus-X turns one
    switch back on over it, minus-X turns one off over the defaults (docs/model.md "Ablation of the additions")."""
    folder = PAPER_TOML.parent / "ablation"
    plain = {**{key: off for key, (_, off) in SWITCHES.items()}, "assign_noise": "none"}
    names = {key: key.removeprefix("ctam_").replace("_", "-") for key in SWITCHES}
    expected = {"plain.toml": plain}
    for key, (on, off) in SWITCHES.items():
        expected[f"plus-{names[key]}.toml"] = {**plain, key: on}
        expected[f"minus-{names[key]}.toml"] = {key: off}
    assert sorted(p.name for p in folder.glob("*.toml")) == sorted(expected)
    for name, settings in expected.items():
        model_settings, train_settings = read_config_file(folder / name)
        assert (model_settings, train_settings) == (settings, {}), name
        ModelConfig(**SMALL, **model_settings)  # every key is a valid setting
