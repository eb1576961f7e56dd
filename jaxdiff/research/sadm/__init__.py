"""SADM: structure-guided adversarial training of diffusion models (Yang et al., CVPR 2024), our reading.

* :mod:`.structure`: the structural distance of a real and a denoised batch (affinity rows, KL).
* :mod:`.step`: one training step updating the denoiser and the structure discriminator.
* :mod:`.experiment`: the ``task="sadm"`` experiment of the training loop (registered on import).
* :mod:`.mixture`: the 2-D version (25-mode grid of Gaussians, MLP denoiser) and its metrics.

See docs/sadm.md for what is the paper's and what is ours.
"""
from jaxdiff.research.sadm.experiment import TASK, SADMExperiment, build_sadm_experiment, check_sadm_config
from jaxdiff.research.sadm.step import SADMTrainState, create_sadm_state, make_sadm_step
from jaxdiff.research.sadm.structure import affinity_log_probs, structural_distance
from jaxdiff.train_lib.experiment import register_task

register_task(TASK, build_sadm_experiment)

__all__ = ["SADMExperiment", "SADMTrainState", "affinity_log_probs", "build_sadm_experiment", "check_sadm_config",
           "create_sadm_state", "make_sadm_step", "structural_distance"]
