"""Model families and their presets.

Each family is one self-contained module with a typed config dataclass and a model class. The
registry below is an explicit table: a checkpoint names its family and stores its config, and
loading looks both up here (no string-to-class reflection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from videovae.models.causal_vae import PRESETS as CAUSAL_VAE_PRESETS
from videovae.models.causal_vae import CausalVAE, CausalVAEConfig
from videovae.models.cvvae import CVVAE, CVVAEConfig
from videovae.models.cvvae import PRESETS as CVVAE_PRESETS
from videovae.models.odvae import ODVAE, ODVAEConfig
from videovae.models.odvae import PRESETS as ODVAE_PRESETS
from videovae.models.onevae import PRESETS as ONEVAE_PRESETS
from videovae.models.onevae import OneVAE, OneVAEConfig
from videovae.models.turbo_vaed import PRESETS as TURBO_VAED_PRESETS
from videovae.models.turbo_vaed import TurboPair, TurboPairConfig, TurboVAED, TurboVAEDConfig


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    model_class: type[nn.Module]


FAMILIES: dict[str, Family] = {
    "causal-vae": Family("causal-vae", CausalVAEConfig, CausalVAE),
    "od-vae": Family("od-vae", ODVAEConfig, ODVAE),
    "cv-vae": Family("cv-vae", CVVAEConfig, CVVAE),
    "onevae": Family("onevae", OneVAEConfig, OneVAE),
    "turbo-vaed": Family("turbo-vaed", TurboVAEDConfig, TurboVAED),
    "turbo-pair": Family("turbo-pair", TurboPairConfig, TurboPair),
}

# preset name -> (family name, config)
PRESETS: dict[str, tuple[str, Any]] = {name: ("causal-vae", cfg) for name, cfg in CAUSAL_VAE_PRESETS.items()}
PRESETS.update({name: ("od-vae", cfg) for name, cfg in ODVAE_PRESETS.items()})
PRESETS.update({name: ("cv-vae", cfg) for name, cfg in CVVAE_PRESETS.items()})
PRESETS.update({name: ("onevae", cfg) for name, cfg in ONEVAE_PRESETS.items()})
PRESETS.update({name: ("turbo-vaed", cfg) for name, cfg in TURBO_VAED_PRESETS.items()})


def family_of(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def build_model(family: str, config: dict[str, Any] | Any) -> nn.Module:
    """Build a model of ``family`` from its config (a dataclass or its ``to_dict()`` form)."""
    fam = family_of(family)
    if isinstance(config, dict):
        config = fam.config_class.from_dict(config)
    return fam.model_class(config)


def from_preset(name: str) -> nn.Module:
    try:
        family, config = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; run `videovae models` for the list") from None
    return build_model(family, config)


__all__ = [
    "CVVAE",
    "FAMILIES",
    "ODVAE",
    "ODVAEConfig",
    "OneVAE",
    "OneVAEConfig",
    "PRESETS",
    "TurboPair",
    "TurboPairConfig",
    "TurboVAED",
    "TurboVAEDConfig",
    "CVVAEConfig",
    "CausalVAE",
    "CausalVAEConfig",
    "build_model",
    "family_of",
    "from_preset",
]
