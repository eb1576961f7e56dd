"""DistriFusion (Li et al., CVPR 2024): displaced patch parallelism for sampling one image on several devices.

See docs/distrifusion.md. :class:`PatchParallelUNet` (+ :class:`DistriConfig`) is the patch-parallel UNet;
:func:`patch_parallel_sampling_model` turns a ``SamplingModel`` into one that samples through it.
"""
from jaxdiff.research.distrifusion.model import MODES, DistriConfig, PatchParallelUNet, patch_mesh
from jaxdiff.research.distrifusion.ops import GN_MODES, PatchComm
from jaxdiff.research.distrifusion.sampling import patch_parallel_sampling_model
from jaxdiff.research.distrifusion.unet import check_covered, check_rows, patch_unet_forward

__all__ = ["DistriConfig", "GN_MODES", "MODES", "PatchComm", "PatchParallelUNet", "check_covered", "check_rows",
           "patch_mesh", "patch_parallel_sampling_model", "patch_unet_forward"]
