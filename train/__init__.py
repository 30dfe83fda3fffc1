"""Training of videovae models with DeepSpeed (installed as ``videovae.train``).

``videovae.train.vae`` is the training job (``videovae train`` / ``deepspeed --module videovae.train.vae``),
``videovae.train.distill`` the Turbo-VAED distillation job (``videovae distill`` / ``deepspeed --module
videovae.train.distill``),
``config`` the typed YAML config, ``data`` the clip dataset, ``losses`` / ``lpips`` / ``discriminator``
the objectives, ``demo`` the ``make demo`` script; ``configs/`` holds ready-made YAML configs.
"""
