"""Packaging beyond setup.cfg: the repository's top-level ``configs/`` ships inside the package as
``jaxdiff.configs``, so an installed ``jaxdiff-train --config digits`` finds the same files."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["jaxdiff", "jaxdiff.*"]) + ["jaxdiff.configs"],
      package_dir={"jaxdiff.configs": "configs"})
