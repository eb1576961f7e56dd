"""A diffusers scheduler config (``scheduler_config.json``) as a jaxdiff noise process and prediction kind.

Only what defines the *trained model* is read (the beta schedule, its length and range, zero-terminal-SNR
rescaling, the prediction type); sampling options such as ``timestep_spacing`` or ``solver_order`` are
jaxdiff's to choose at sampling time.
"""
from __future__ import annotations

import json
import os

from jaxdiff.noise import NoiseProcess, make_process

BETA_SCHEDULES = {"linear": "vp_linear", "scaled_linear": "vp_scaled_linear", "squaredcos_cap_v2": "vp_cosine"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def process_from_scheduler_config(cfg: dict) -> tuple[NoiseProcess, str]:
    """``(process, prediction)`` for a diffusers DDPM-family scheduler config dict.

    Raises ValueError naming the field for schedules jaxdiff cannot express (``trained_betas``, unknown
    ``beta_schedule`` or ``prediction_type``)."""
    if cfg.get("trained_betas") is not None:
        raise ValueError("scheduler config has explicit trained_betas; build the process with "
                         "VPDiscrete.from_alphas_cumprod(np.cumprod(1 - betas)) instead")
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"unsupported beta_schedule {schedule!r}; supported: {sorted(BETA_SCHEDULES)}")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {pred!r}; supported: {sorted(PREDICTION_TYPES)}")
    kwargs = dict(num_train_steps=int(cfg.get("num_train_timesteps", 1000)),
                  zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)))
    if schedule != "squaredcos_cap_v2":
        kwargs.update(beta_start=float(cfg.get("beta_start", 1e-4)), beta_end=float(cfg.get("beta_end", 0.02)))
    return make_process(BETA_SCHEDULES[schedule], **kwargs), PREDICTION_TYPES[pred]


def read_scheduler_config(folder: str) -> dict:
    """``scheduler_config.json`` of a pipeline folder (``<folder>/scheduler/``) or a model folder."""
    for path in (os.path.join(folder, "scheduler", "scheduler_config.json"),
                 os.path.join(folder, "scheduler_config.json")):
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    raise FileNotFoundError(f"no scheduler_config.json in {folder} or {folder}/scheduler: the noise schedule "
                            "the model was trained with is needed to sample from it")
