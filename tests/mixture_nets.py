"""Exact networks of an isotropic Gaussian mixture, shaped like the project's networks.

Data p_0 = sum_k w_k N(m_k, S_k I) in D = 2 dimensions, stored as images [N, 2, 1, 1]. Under the
VP diffusion of a table alphas_cumprod (log abar interpolated linearly between steps, as
guided.diffusion.sde.DiscreteVPSDE), x_t ~ sum_k w_k N(a m_k, (a^2 S_k + s^2) I), a^2 = abar, s^2 = 1 - abar,
so the eps network, the noise-aware classifier p(k | x_t) and the clean classifier are exact:
  MixtureEps        eps(x, t, y) = -s grad log p_t(x | y); y = K (the null class) or None: the mixture
  MixtureClassifier logits log w_k + log N_k(x_t) at timestep t (t = 0: the clean posterior)
  MixtureNCSN       the score at the ladder index of an NCSN network, sigma_i^2 added to S_k
`inflate` multiplies every S_k: the same mixture with inflated variances (autoguidance's weak model).
"""
import math

import torch

from guided.config import ClassifierConfig, UNetConfig, node

MEANS = torch.tensor([[0.6, -0.4], [-0.5, 0.5]])
VARS = torch.tensor([0.04, 0.02])
WEIGHTS = torch.tensor([0.5, 0.5])


class _Mixture(torch.nn.Module):
    def __init__(self, alphas_cumprod=None, means=MEANS, variances=VARS, weights=WEIGHTS, inflate=1.0):
        super().__init__()
        self.means, self.vars, self.logw = means.double(), variances.double() * inflate, weights.double().log()
        if alphas_cumprod is not None:
            self.log_abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).log()

    def abar(self, t):
        tf = t.double().clamp(0, len(self.log_abar) - 1)
        lo = tf.floor().long()
        hi = (lo + 1).clamp(max=len(self.log_abar) - 1)
        return torch.lerp(self.log_abar[lo], self.log_abar[hi], tf - lo).exp()

    def components(self, x, a, noise_var):
        """log N_k(x; a m_k, (a^2 S_k + noise_var) I) [N, K] and the per-component scores [N, K, D]."""
        var = a[:, None] ** 2 * self.vars[None] + noise_var[:, None]  # [N, K]
        diff = x[:, None, :] - a[:, None, None] * self.means[None]  # [N, K, D]
        d = x.shape[1]
        logn = -0.5 * (diff**2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
        return logn, -diff / var[..., None]


class MixtureEps(_Mixture):
    def __init__(self, alphas_cumprod, **kw):
        super().__init__(alphas_cumprod, **kw)
        self.num_classes = len(self.means)
        self.cfg = node(UNetConfig, dict(image_size=1, in_channels=self.means.shape[1], num_classes=self.num_classes,
                                         null_class=True, learn_sigma=False, num_head_channels=-1))

    def forward(self, x, t, y=None):
        flat = x.reshape(len(x), -1).double()
        abar = self.abar(t)
        logn, scores = self.components(flat, abar.sqrt(), 1 - abar)
        post = torch.softmax(self.logw + logn, dim=1)
        if y is not None:  # the asked component, or the mixture for the null class
            pick = torch.nn.functional.one_hot(y.clamp(max=self.num_classes - 1), self.num_classes).double()
            post = torch.where((y == self.num_classes)[:, None], post, pick)
        score = (post[..., None] * scores).sum(1)
        return (-(1 - abar).sqrt()[:, None] * score).to(x.dtype).reshape(x.shape)


class MixtureClassifier(_Mixture):
    def __init__(self, alphas_cumprod, **kw):
        super().__init__(alphas_cumprod, **kw)
        self.cfg = node(ClassifierConfig, dict(image_size=1, in_channels=self.means.shape[1], num_classes=len(self.means)))

    def forward(self, x, t):
        abar = self.abar(t)
        logn, _ = self.components(x.reshape(len(x), -1).double(), abar.sqrt(), 1 - abar)
        return (self.logw + logn).to(x.dtype)


class MixtureNCSN(_Mixture):
    """score(x, i) of p_0 convolved with N(0, sigma_i^2 I), the ladder index i as an NCSN network sees it."""

    def __init__(self, sigmas, **kw):
        super().__init__(None, **kw)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        self.num_classes = None
        self.cfg = node(UNetConfig, dict(image_size=1, in_channels=2, num_classes=None, learn_sigma=False,
                                         num_head_channels=-1))

    def forward(self, x, t, y=None):
        flat = x.reshape(len(x), -1).double()
        s2 = self.sigmas[t.long()] ** 2
        logn, scores = self.components(flat, torch.ones_like(s2), s2)
        post = torch.softmax(self.logw + logn, dim=1)
        return (post[..., None] * scores).sum(1).to(x.dtype).reshape(x.shape)


class LadderClassifier(_Mixture):
    def __init__(self, sigmas, **kw):
        super().__init__(None, **kw)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        self.cfg = node(ClassifierConfig, dict(image_size=1, in_channels=self.means.shape[1], num_classes=len(self.means)))

    def forward(self, x, t):
        s2 = self.sigmas[t.long()] ** 2
        logn, _ = self.components(x.reshape(len(x), -1).double(), torch.ones_like(s2), s2)
        return (self.logw + logn).to(x.dtype)
