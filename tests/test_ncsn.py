"""NCSN end to end: a classifier on the same sigma ladder guides annealed Langevin dynamics."""
import json
from pathlib import Path

import torch

from guided.samplers.registry import serving

from guided.config import DiffusionConfig, load_config, node
from guided.diffusion.ladder import geometric_sigmas
from guided.diffusion.objectives import NCSNObjective, objective_from_config
from guided.generation import Pipeline, SampleOptions, sample_batch
from guided.networks.checkpoints import load_trained
from guided.training.classifier import train_classifier
from guided.training.diffusion import train_diffusion

LADDER = ["train.objective.ncsn_sigma_max=2.0", "train.objective.ncsn_sigma_min=0.05", "train.objective.ncsn_levels=4"]


def test_ladder_noise_runs_from_small_to_large_sigma():
    cfg = load_config(None, ["train.objective=ncsn", "train.ncsn_sigma_max=2.0", "train.ncsn_sigma_min=0.02",
                             "train.ncsn_levels=10"])  # the old flat names still work
    objective = objective_from_config(cfg)
    assert isinstance(objective, NCSNObjective) and objective.num_levels == 10
    assert torch.equal(objective.sigmas, geometric_sigmas(2.0, 0.02, 10))
    x0, z = torch.zeros(2, 1), torch.ones(2, 1)
    assert torch.allclose(objective.noise(x0, torch.tensor([0, 9]), z).flatten(), torch.tensor([0.02, 2.0]))
    assert objective.network_t(torch.tensor([0, 9])).tolist() == [9, 0]
    assert serving(objective.kind) == ("pc", "langevin")


def test_ncsn_classifier_trains_and_guides_langevin(tiny):
    clf_cfg = tiny("classifier", "train.objective=ncsn", *LADDER, "train.steps=6")
    trainer = train_classifier(clf_cfg).trainer
    rows = [json.loads(r) for r in (Path(clf_cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_q3" in r for r in rows)  # logged per quarter of the ladder
    net_cfg = tiny("diffusion", "train.objective=ncsn", "model.learn_sigma=false", *LADDER, "train.steps=2")
    train_diffusion(net_cfg)
    model, run_cfg, labels = load_trained(Path(net_cfg.train.out_dir))
    classifier, _, _ = load_trained(Path(clf_cfg.train.out_dir))
    sigmas = geometric_sigmas(2.0, 0.05, 4)
    p = Pipeline(model, node(DiffusionConfig), classifier, labels, objective="ncsn", ncsn_sigmas=sigmas)
    y, seeds = [4] * 8, list(range(8))

    def logp(scale):
        x = sample_batch(p, y, seeds, SampleOptions(sampler="langevin", scale=scale,
                                                    settings={"n_steps_each": 5}))
        with torch.no_grad():  # the classifier at the smallest sigma (ladder index L - 1)
            logits = trainer.net.eval()(x, torch.full((8,), 3))
        return torch.log_softmax(logits, -1)[:, 4].mean().item()

    assert logp(20.0) > logp(0.0)
