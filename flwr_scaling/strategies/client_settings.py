"""The settings a client trains with, written by the strategy into every train and warm-up message.

One source of truth: the strategy's own constructor decides the scaling rule,
its mode, alpha, beta, adam's beta1, the Hutchinson probes and (unless the
app's ``train_config`` gives one) the client step size, and sends them in the
message's ConfigRecord. A client reads them from there
(``flwr_scaling.clients.preconditioner_from_message``) and never repeats them
by hand, so a server and its clients cannot train with different settings
unnoticed. A ``train_config`` that names one of these settings with another
value than the strategy's is refused before any message is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import ConfigRecord

from flwr_scaling.core.rules import get_rule

# Config keys the strategy owns (the ConfigRecord spelling the package's clients read).
RULE_KEY = "precond"
MODE_KEY = "precond-mode"
ALPHA_KEY = "precond-alpha"
BETA_KEY = "precond-beta"
ADAM_BETA1_KEY = "adam-beta1"
PROBES_KEY = "precond-probes"
LR_KEY = "lr"
# What a client assumes when a key is absent (``Preconditioner``'s defaults).
DEFAULT_ADAM_BETA1 = 0.9
DEFAULT_PROBES = 1


@dataclass(frozen=True)
class ClientSettings:
    """What every client of a ``Savic`` strategy trains with.

    Parameters
    ----------
    precond, precond_mode : str
        Scaling rule and mode.
    precond_alpha, precond_beta : float
        Lower clip of D̂ and the state's moving-average factor.
    adam_beta1 : float, optional
        First-moment factor (adam); ``None``: the train config's
        ``adam-beta1`` when it has one, else 0.9.
    precond_probes : int, optional
        Hutchinson probes per step (oasis); ``None``: the train config's
        ``precond-probes`` when it has one, else 1.
    lr : float, optional
        Client step size; the train config's ``lr``, when it has one, takes
        precedence (an app may schedule it). ``None``: the rule's default for
        the mode.
    """

    precond: str
    precond_mode: str
    precond_alpha: float
    precond_beta: float
    adam_beta1: float | None = None
    precond_probes: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.adam_beta1 is not None and not 0.0 <= self.adam_beta1 < 1.0:
            raise ValueError(f"adam_beta1 must be in [0, 1), got {self.adam_beta1}")
        probes = self.precond_probes
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
            raise ValueError(f"precond_probes must be an integer >= 1, got {probes!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")

    def write(self, config: ConfigRecord) -> None:
        """Put every setting into ``config`` (the round's train config, in place).

        Raises
        ------
        ValueError
            ``config`` already names a setting with another value than the
            strategy's, or no step size is known (the rule has no default
            and neither ``lr`` nor the train config gives one).
        """
        owned = {
            RULE_KEY: self.precond,
            MODE_KEY: self.precond_mode,
            ALPHA_KEY: float(self.precond_alpha),
            BETA_KEY: float(self.precond_beta),
            ADAM_BETA1_KEY: None if self.adam_beta1 is None else float(self.adam_beta1),
            PROBES_KEY: self.precond_probes,
        }
        defaults = {ADAM_BETA1_KEY: DEFAULT_ADAM_BETA1, PROBES_KEY: DEFAULT_PROBES}
        for key, value in owned.items():
            given = config.get(key)
            if value is None:  # not set on the strategy: the train config's, else the client default
                config[key] = given if given is not None else defaults[key]
                continue
            if given is not None and given != value:
                raise ValueError(
                    f"train_config sets {key} = {given!r} but the strategy trains with {value!r}: "
                    f"leave {key} out of train_config (the strategy sends it to the clients)"
                )
            config[key] = value
        if config.get(LR_KEY) is None:
            config[LR_KEY] = self.step_size()

    def step_size(self) -> float:
        """``lr``, else the rule's default step size for the mode."""
        if self.lr is not None:
            return float(self.lr)
        rule = get_rule(self.precond)
        if rule.default_lr is None:
            raise ValueError(
                f"scaling rule {rule.name!r} has no default step size: pass lr=... to the strategy "
                "or put 'lr' in train_config"
            )
        return float(rule.default_lr[self.precond_mode])
