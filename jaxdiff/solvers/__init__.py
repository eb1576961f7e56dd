"""Solvers: pure step functions run by one `lax.scan` driver (`sample`); DEIS; time grids learned through
the sampler (`learn_grid`, solvers/learned_grid.py)."""
from jaxdiff.solvers.base import Threshold
from jaxdiff.solvers.ddim import DDIM, DDPM
from jaxdiff.solvers.deis import DEIS
from jaxdiff.solvers.dpm_solver import (DPMSolverMultistep, DPMSolverSinglestep, diffusers_singlestep_plan,
                                        dpm_solver_fast_plan)
from jaxdiff.solvers.karras import IPNDM, Euler, Heun
from jaxdiff.solvers.sampling import SOLVERS, make_solver, sample
from jaxdiff.solvers.unipc import UniPC
from jaxdiff.solvers.learned_grid import LearnedGrid, learn_grid, teacher_solution

__all__ = ["DDIM", "DDPM", "DEIS", "DPMSolverMultistep", "DPMSolverSinglestep", "Euler", "Heun", "IPNDM",
           "LearnedGrid", "SOLVERS", "Threshold", "UniPC", "diffusers_singlestep_plan", "dpm_solver_fast_plan",
           "learn_grid", "make_solver", "sample", "teacher_solution"]
