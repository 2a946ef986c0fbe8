"""The settings of the agents' representation, checked without torch: AuxConfig, every setting of the auxiliary
loss (`aux.*` on minc_rl.train's command line) checked in one place, and the encoder names (`encoder=`).

Kept free of torch and SB3 (the loss module is imported only to check aux.loss_kwargs, the options only the loss
itself knows), so that minc_rl.train rejects a bad value before it imports them. How the aux settings act: the
docstring of minc_rl.agents.auxiliary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from minc_rl.common.checks import check_choice, check_fraction, check_int, check_positive

if TYPE_CHECKING:
    from torch import nn

ENCODER_CHOICES = ("auto", "impala", "nature", "minatar", "mlp")  # auto, then minc_rl.ssl.encoders.ENCODERS
LATENT_LOSSES = ("mse", "cosine", "minc")  # aux=selfpred's latent loss: a light copy of minc_rl.losses.latent's
AUX_CHOICES = ("none", "minc", "spectral", "infonce", "selfpred")  # none, minc_rl.losses.AUX_LOSSES, selfpred
AUX_MODES = ("joint", "separate", "decoupled")
AUGMENT_CHOICES = ("none", "shift")
PAIR_CHOICES = ("state", "state_action")
SOURCE_CHOICES = ("replay", "td")
TARGET_CHOICES = ("stop_gradient", "ema", "q_target", "none")
# the settings a saved aux state (head, Lambda, target encoder, aux optimizer) is built for
STATE_SETTINGS = ("name", "mode", "dim", "head_hidden", "pairs", "linear_critic", "latent_loss", "reward")


@dataclasses.dataclass(frozen=True)
class AuxConfig:
    """Settings of the auxiliary loss (`aux.*` on minc_rl.train's command line); invalid values raise ValueError."""

    name: str = "minc"  # none | minc | spectral | infonce
    mode: str = "joint"  # joint | separate | decoupled (see the module docstring)
    share: float = 0.01  # joint: the aux share of the gradient norm at the encoder's output, in [0, 1) (calibrated)
    lr: float = 3e-4  # the aux optimizer's Adam learning rate (the head; the encoder too in separate / decoupled)
    max_grad_norm: float = 10.0  # the aux optimizer's gradient clip
    dim: int = 64  # embedding size d (Lambda is d x d)
    batch: int = 256  # pairs per gradient step (MincDQN with source="replay"; with "td" the TD batch's batch_size)
    every: int = 1  # MincDQN: the aux loss joins every k-th TD step (the others are the RL step alone)
    source: str | None = None  # MincDQN: td (the TD batch's own pairs; None: this default) | replay (aux.batch apart)
    ema: float = 0.2  # MINC's EMA rate of Lambda
    augment: str = "none"  # none | shift (DrQ random shift of both views; image observations)
    target_tau: float | None = None  # None: o_t+1 through the online encoder under stop-gradient; else EMA target
    head_hidden: int = 256  # hidden width of the projection head
    pairs: str = "state"  # state: phi(o_t) against phi(o_t+1); state_action: phi(o_t, a_t) against mu(o_t+1)
    linear_critic: bool = False  # MincDQN, state_action pairs: Q(s, a) = phi(s, a)^T w + c, phi learned by the aux loss
    log_update_share: bool = False  # log the aux share of the encoder's parameter update (UpdateShareMeter)
    weight: float | None = None  # joint: a fixed weight w of the aux gradient at the encoder's output in place of share
    horizon: int = 5  # selfpred: the rollout's length K
    latent_loss: str = "mse"  # selfpred: mse (Voelcker et al.) | cosine (SPR) | minc (prediction as phi, target as mu)
    reward: bool = True  # selfpred: predict r_t+k from (z_t+k, a_t+k) as well (MSE, weight 1)
    target: str | None = None  # what embeds o_t+k (None: ema when target_tau is set, else stop_gradient; TARGET_CHOICES)
    loss_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. spectral: mu; infonce: temperature

    def __post_init__(self) -> None:
        check_choice("aux", self.name, AUX_CHOICES)
        check_choice("aux.mode", self.mode, AUX_MODES)
        check_choice("aux.augment", self.augment, AUGMENT_CHOICES)
        check_choice("aux.pairs", self.pairs, PAIR_CHOICES)
        self._check_selfpred()
        if self.source is not None:
            check_choice("aux.source", self.source, SOURCE_CHOICES)
        for key in ("linear_critic", "log_update_share"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"aux.{key} must be true or false; got {getattr(self, key)!r}")
        if self.linear_critic and (self.pairs != "state_action" or self.mode == "joint" or self.name == "none"):
            raise ValueError(
                "aux.linear_critic=True puts Q on the aux loss's phi(s, a), which the aux loss alone trains: it needs "
                f"an aux loss, aux.pairs='state_action' and aux.mode 'separate' or 'decoupled'; got aux={self.name!r}, "
                f"aux.pairs={self.pairs!r}, aux.mode={self.mode!r}"
            )
        if not isinstance(self.share, (int, float)) or isinstance(self.share, bool) or not 0.0 <= self.share < 1.0:
            raise ValueError(f"aux.share must be in [0, 1); got {self.share!r}")
        check_positive("aux.lr", self.lr)
        check_positive("aux.max_grad_norm", self.max_grad_norm)
        check_int("aux.dim", self.dim, 1)
        check_int("aux.batch", self.batch, 2)
        check_int("aux.every", self.every, 1)
        if self.source == "td" and self.batch != AuxConfig.batch:
            raise ValueError(f"aux.batch={self.batch} sets the count of replay pairs; with aux.source='td' (MincDQN's "
                             "default) the pairs are the TD batch's own (the agent's batch_size): leave aux.batch at "
                             "its default, or set aux.source='replay'")
        if self.every > 1 and self.log_update_share:
            raise ValueError(f"aux.log_update_share splits every step's update; it needs aux.every=1, got {self.every}")
        check_int("aux.head_hidden", self.head_hidden, 1)
        check_fraction("aux.ema", self.ema)
        if self.target_tau is not None:
            check_fraction("aux.target_tau (None: stop-gradient online encoder)", self.target_tau)
        if not isinstance(self.loss_kwargs, Mapping):
            raise ValueError(f"aux.loss_kwargs must be a mapping of the loss's options; got {self.loss_kwargs!r}")
        if self.name == "none" and self.loss_kwargs:
            raise ValueError(f"aux.loss_kwargs={dict(self.loss_kwargs)!r} were given, but aux='none' has no loss")
        for key, setting in (("ema", "aux.ema"), ("asymmetric", "aux.pairs")):
            if key in self.loss_kwargs:
                raise ValueError(f"aux.loss_kwargs may not set {key!r} (got {self.loss_kwargs[key]!r}); set {setting}")
        if self.name not in ("none", "selfpred") and self.loss_kwargs:
            self.build_loss()  # an option the loss does not take fails here, before any network is built

    def _check_selfpred(self) -> None:
        """The settings of the self-prediction loss (and aux.target and aux.weight, which the pair losses take too)."""
        check_int("aux.horizon", self.horizon, 1)
        check_choice("aux.latent_loss", self.latent_loss, LATENT_LOSSES)
        if not isinstance(self.reward, bool):
            raise ValueError(f"aux.reward must be true or false; got {self.reward!r}")
        if self.weight is not None:
            check_positive("aux.weight (null: aux.share sets the balance)", self.weight)
        if self.target is not None:
            check_choice("aux.target", self.target, TARGET_CHOICES)
        if self.target is not None and (self.target == "ema") != (self.target_tau is not None):
            raise ValueError(f"aux.target={self.target!r} and aux.target_tau={self.target_tau!r}: an EMA target needs "
                             "its rate (aux.target=ema with aux.target_tau in (0, 1]), and only it takes one")
        if self.name == "selfpred":
            if self.pairs != "state" or self.linear_critic or self.augment != "none" or self.loss_kwargs:
                raise ValueError("aux=selfpred rolls its own latent model from o_t; aux.pairs, aux.linear_critic, "
                                 "aux.augment and aux.loss_kwargs are the pair losses' settings: leave them at their "
                                 f"defaults (got pairs={self.pairs!r}, linear_critic={self.linear_critic!r}, "
                                 f"augment={self.augment!r}, loss_kwargs={dict(self.loss_kwargs)!r})")
        elif self.target == "none":
            raise ValueError(f"aux.target='none' (the online encoder with gradient on both sides) is built for "
                             f"aux=selfpred; aux={self.name!r} embeds o_t+1 without gradient")

    @property
    def target_kind(self) -> str:
        """What embeds o_t+k: aux.target, or from aux.target_tau when unset (ema with a rate, else stop_gradient)."""
        return self.target or ("stop_gradient" if self.target_tau is None else "ema")

    @classmethod
    def of(cls, aux: str | AuxConfig | Mapping[str, Any]) -> AuxConfig:
        """An AuxConfig from a loss name ("minc"), a mapping of settings, or an AuxConfig."""
        if isinstance(aux, AuxConfig):
            return aux
        if isinstance(aux, Mapping):
            unknown = sorted(set(aux) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"unknown aux settings {unknown}; valid: {[f.name for f in dataclasses.fields(cls)]}")
            return cls(**aux)
        if not isinstance(aux, str):
            raise ValueError(f"aux must be a loss name ({', '.join(AUX_CHOICES)}), an AuxConfig or a mapping of its "
                             f"settings; got {aux!r}")
        return cls(name=aux)

    def check_takes_state_of(self, saved: AuxConfig, where: str) -> None:
        """Raise ValueError unless an aux state saved under `saved` fits these settings (STATE_SETTINGS and whether
        there is a target encoder); the others (share, lr, every, source, ...) may change between runs."""
        differ = [f"aux.{key}={getattr(self, key)!r} (saved: {getattr(saved, key)!r})"
                  for key in STATE_SETTINGS if getattr(self, key) != getattr(saved, key)]
        if (self.target_kind == "ema") != (saved.target_kind == "ema"):
            differ.append(f"aux.target_tau={self.target_tau!r} (saved: {saved.target_tau!r})")
        if differ:
            raise ValueError(
                f"{where}: the saved aux state (head, Lambda, optimizer) was built for other settings: "
                f"{', '.join(differ)}; keep those as saved (settings such as share, lr, every or source may change)"
            )

    def build_loss(self) -> nn.Module:
        """The loss module these settings name (minc_rl.losses, imported here: checking settings needs no torch)."""
        from minc_rl.losses import build_aux_loss

        minc_options = {"ema": self.ema, **({"asymmetric": True} if self.pairs == "state_action" else {})}
        options = {**self.loss_kwargs, **(minc_options if self.name == "minc" else {})}
        try:
            return build_aux_loss(self.name, self.dim, **options)
        except ValueError as error:
            raise ValueError(f"aux.loss_kwargs: {error}") from None
