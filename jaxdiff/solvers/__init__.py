"""Solvers: pure step functions run by one `lax.scan` driver (`sample`)."""
from jaxdiff.solvers.base import Threshold
from jaxdiff.solvers.ddim import DDIM, DDPM
from jaxdiff.solvers.dpm_solver import (DPMSolverMultistep, DPMSolverSinglestep, diffusers_singlestep_plan,
                                        dpm_solver_fast_plan)
from jaxdiff.solvers.karras import IPNDM, Euler, Heun
from jaxdiff.solvers.sampling import SOLVERS, make_solver, sample
from jaxdiff.solvers.unipc import UniPC

__all__ = ["DDIM", "DDPM", "DPMSolverMultistep", "DPMSolverSinglestep", "Euler", "Heun", "IPNDM", "SOLVERS",
           "Threshold", "UniPC", "diffusers_singlestep_plan", "dpm_solver_fast_plan", "make_solver",
           "sample"]
