"""Training the noise-aware classifier p(y | x_t, t) (the reference's classifier_train.py).

The noise is the objective's (guided.diffusion.objectives): with train.objective.name=ncsn
it is NCSN's, x = x_0 + sigma_i z over the geometric ladder of the NCSN score model
(train.objective.ncsn_*), and the classifier sees the ladder index i, as the score model
does, so it can guide annealed Langevin dynamics.

Each step noises the clean batch to x_t = q_sample(x_0, t) at original timesteps
t ~ U{0..T-1} and minimises the cross-entropy of the clean label (Dhariwal & Nichol
sec. 4.1); the paper trains it with AdamW (lr 3e-4, weight decay 0.05), the
learning rate annealed linearly to 0 (train.anneal_lr). Every train.eval.every
steps the held-out images (the digits' heldout split, or data.val_root) are
scored once in each quarter of the timestep range: top-1 and top-5 per quarter.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from guided.data import build_dataset, shard_indices
from guided.errors import GuidedError
from guided.networks.unet import EncoderUNetModel
from guided.training.meters import QuarterMeter, derive_seed
from guided.training.progress import band_ece, plot_bands
from guided.diffusion.recipes import is_default
from guided.training.trainer import TrainResult, Trainer, train
from guided.guidance.calibration import Calibration, calibrate


def top_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 where the label is among the k highest logits, per example."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).float()


class ClassifierTrainer(Trainer):
    kind, net_cfg_key = "classifier", "classifier"

    def fit_config_to_data(self):
        super().fit_config_to_data()
        if self.cfg.train.objective.schedule_sampler != "uniform":
            raise GuidedError("the classifier is trained at uniform timesteps: set train.schedule_sampler=uniform")
        if not is_default(self.cfg.train.objective):
            raise GuidedError("train.objective.weighting and prediction are score-model recipes: leave them "
                              "uniform and eps for a classifier")
        if not self.objective.noises_classifier:
            raise GuidedError("the classifier trains on the diffusion's noise (train.objective=eps) or an NCSN "
                              f"ladder (ncsn), not {self.objective.name!r}")
        self.set_num_classes(self.cfg.classifier)
        self.calibration = CalibrationPart()

    def build_model(self):
        self.val = self.build_val()
        self.last_eval = {}
        try:
            return EncoderUNetModel(self.cfg.classifier)
        except ValueError as e:
            raise GuidedError(f"cannot build the classifier of this config: {e}") from None

    def state_parts(self) -> dict:
        return {**super().state_parts(), "calibration": self.calibration}

    def build_val(self):
        """The held-out images, with the training classes, unaugmented; None when there are none."""
        d = OmegaConf.to_container(self.cfg.data, resolve=True)
        d.update(random_flip=False, random_crop=False, classes=list(self.label_map.keys))
        if d["kind"] == "digits":
            d["split"] = "heldout"
        elif d.get("val_root"):
            if not Path(d["val_root"]).expanduser().is_dir():
                raise GuidedError(f"held-out folder {d['val_root']} does not exist or is not a folder; set "
                                  f"data.val_root (class folders of held-out images), or null for no evaluation")
            d["root"] = d["val_root"]
        else:
            self.print("note: no held-out images (set data.val_root): no evaluation")
            return None
        return self.encoded(build_dataset(d), "heldout")

    def prepare_batch(self, x0, y):
        n = len(x0)
        if not self.cfg.train.objective.noised:
            return dict(x=x0, t=torch.zeros(n, dtype=torch.long, device=self.device), y=y)
        t = self.objective.draw_levels(n, self.device, self.rngs.gen)
        noise = torch.randn(x0.shape, generator=self.rngs.noise_gen, device=self.device)
        return dict(x=self.objective.noise(x0, t, noise), t=t, y=y)

    def scores(self, model, x, t, y) -> dict:
        logits = model(x, self.objective.network_t(t)).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        return {"loss": loss, "acc@1": top_k(logits, y, 1), "acc@5": top_k(logits, y, 5), "logits": logits}

    def losses(self, b):
        values = self.scores(self.model, b["x"], b["t"], b["y"])
        return values["loss"].mean(), {k: v.detach() for k, v in values.items() if k != "logits"}

    @torch.no_grad()
    def evaluate(self):
        """Top-1 / top-5 on up to train.eval.images held-out images, each scored at one t drawn in every
        band of t (train.eval.bands; quarters with 0), with the ECE per band; the same images and draws at
        every evaluation. Logged per quarter (val_*_q*) and per band (val_*_b*), fed to the done and
        diverging signals (progress.py)."""
        if self.val is None:
            return
        tc, ev, T = self.cfg.train, self.cfg.train.eval, self.objective.num_levels
        order = shard_indices(len(self.val), 0, 1, tc.seed)[:ev.images][self.rank::self.world]
        gen = torch.Generator().manual_seed(derive_seed(tc.seed, self.rank, 7))
        B = min(ev.bands or 4, T) if tc.objective.noised else 0
        quarters, bands = QuarterMeter(T, self.device), QuarterMeter(T, self.device, bins=max(B, 1), tag="b")
        logits = [[] for _ in range(B)]
        self.net.eval()
        for i in range(0, len(order), self.local_batch):
            items = [self.val[j] for j in order[i:i + self.local_batch]]
            x0 = torch.stack([x for x, _ in items]).to(self.device)
            y = torch.tensor([label for _, label in items], device=self.device)
            for b in range(B) if B else [None]:
                if b is None:
                    t, x = torch.zeros(len(y), dtype=torch.long), x0
                else:
                    t = torch.randint((b * T + B - 1) // B, ((b + 1) * T + B - 1) // B, (len(y),), generator=gen)
                    x = self.objective.noise(x0, t.to(self.device), torch.randn(x0.shape, generator=gen).to(x0))
                values = self.scores(self.net, x, t.to(self.device), y)
                quarters.add(t, {k: v for k, v in values.items() if k != "logits"})
                if b is not None:
                    bands.add(t, {"acc@1": values["acc@1"]})
                    logits[b].append((values["logits"].cpu(), y.cpu()))
        self.net.train()
        if self.step >= tc.steps and tc.objective.noised and ev.calibration_bands:
            self.fit_calibration(order, gen)
        stats = {f"val_{k}": v for k, v in quarters.flush(self.accel).items()}
        if B and ev.bands:
            stats.update(self.band_stats(bands, logits, B, T))
        self.last_eval = stats
        self.record(stats)
        line = " ".join(f"{stats.get(f'val_acc@1_q{q}', float('nan')):.1%}" for q in range(4))
        self.print(f"eval step {self.step} ({len(self.val)} held-out, {min(ev.images, len(self.val))} used): "
                   f"top-1 {stats.get('val_acc@1', 0):.1%} (quarters {line}), top-5 {stats.get('val_acc@5', 0):.1%}")
        if B and ev.bands:
            self.see_bands(stats, B)

    def band_stats(self, meter, logits, B: int, T: int) -> dict:
        """val_acc@1_b<i> and val_ece_b<i> (ECE over every process's draws in band i), with the band edges."""
        from accelerate.utils import gather_object

        acc = {k.replace("acc@1_b", "val_acc@1_b"): v for k, v in meter.flush(self.accel).items() if "_b" in k}
        mine = logits_cat(logits)
        per_band = gather_object([mine]) if self.world > 1 else [mine]
        ece = {}
        for b in range(B):
            parts = [p[b] for p in per_band if p[b] is not None]
            if parts:
                ece[f"val_ece_b{b}"] = band_ece(torch.cat([z for z, _ in parts]), torch.cat([y for _, y in parts]))
        edges = [(b * T + B - 1) // B for b in range(B + 1)]
        return {**acc, **ece, "val_band_edges": edges}

    def see_bands(self, stats: dict, B: int):
        """The accuracy-per-band line, the done and diverging signals."""
        ev = self.cfg.train.eval
        acc = [stats.get(f"val_acc@1_b{b}", float("nan")) for b in range(B)]
        ece = [stats.get(f"val_ece_b{b}", float("nan")) for b in range(B)]
        edges = stats["val_band_edges"]
        self.print("  top-1 / ECE per band of t: " + ", ".join(
            f"{edges[b]}-{edges[b + 1] - 1}: {a:.1%}/{e:.3f}" for b, (a, e) in enumerate(zip(acc, ece))))
        done = self.progress.see_eval(self.step, acc, ece, stats.get("val_acc@1", 0.0), ev.done_margin,
                                      ev.done_window, self.print, n=min(ev.images, len(self.val)))
        if done:
            self.record(done)

    def finish(self):
        """out_dir/accuracy_by_t.png: top-1 and ECE against t, one line per evaluation (main process)."""
        if self.accel.is_main_process and self.progress.steps:
            B, T = len(self.progress.acc[-1]), self.objective.num_levels
            edges = [(b * T + B - 1) // B for b in range(B + 1)]
            path = self.out_dir / "accuracy_by_t.png"
            plot_bands(self.progress, edges, path, title=f"held-out top-1, {self.out_dir.name}")
            self.print(f"accuracy against t: {path}")

    @torch.no_grad()
    def fit_calibration(self, order, gen, draws: int = 4):
        """A softmax temperature per band of timesteps (guided/guidance/calibration.py), fitted on half of the
        held-out images x_t and reported (accuracy, ECE before/after) on the other half; main process."""

        if not self.accel.is_main_process:
            return
        T = self.objective.num_levels
        edges = torch.linspace(0, T, min(self.cfg.train.eval.calibration_bands, T) + 1).round().unique()  # whole steps
        K = len(edges) - 1
        logits, labels, ts = [], [], []
        self.net.eval()
        for i in range(0, len(order), self.local_batch):
            items = [self.val[j] for j in order[i:i + self.local_batch]]
            x0 = torch.stack([x for x, _ in items]).to(self.device)
            y = torch.tensor([label for _, label in items])
            for k in range(K * draws):
                lo, hi = int(edges[k // draws]), int(edges[k // draws + 1])
                t = torch.randint(lo, hi, (len(y),), generator=gen)
                x = self.objective.noise(x0, t.to(self.device), torch.randn(x0.shape, generator=gen).to(x0))
                logits.append(self.net(x, self.objective.network_t(t.to(self.device))).float().cpu())
                labels.append(y)
                ts.append(self.objective.network_t(t).double())
        self.net.train()
        edges = self.objective.band_edges(edges)  # in the timestep the classifier sees
        self.calibration.fitted, report = calibrate(torch.cat(logits), torch.cat(labels), torch.cat(ts), edges)
        self.record({f"calib_{r['band']}_{k}": r[k] for r in report
                     for k in ("temperature", "accuracy", "ece_before", "ece_after")})
        for r in report:
            self.print(f"calibration band {r['band']} (t {r['t_from']:.0f}-{r['t_to']:.0f}): temperature "
                       f"{r['temperature']:.3f} ({r['errors']} errors to fit on), accuracy {r['accuracy']:.1%}, ECE {r['ece_before']:.4f} -> "
                       f"{r['ece_after']:.4f} ({r['n']} held-out draws)")


def logits_cat(logits) -> list:
    """Per band: (logits, labels) of this process's draws, or None."""
    return [(torch.cat([z for z, _ in lg]), torch.cat([y for _, y in lg])) if lg else None for lg in logits]


class CalibrationPart:
    """The calibration fitted at the end (guided.guidance.calibration.Calibration, or None), as a
    part of the run state: saved in checkpoints and exported with the weights."""

    def __init__(self):
        self.fitted = None

    def state_dict(self):
        return self.fitted.to_dict() if self.fitted is not None else None

    def load_state_dict(self, d):

        self.fitted = Calibration.from_dict(d)


def train_classifier(cfg, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train (or with resume, continue) the noise-aware classifier of `cfg`; says how the run ended."""
    return train(ClassifierTrainer, cfg, resume=resume, stop_after=stop_after)
