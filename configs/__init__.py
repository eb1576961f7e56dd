"""The configs shipped with jaxdiff (installed as ``jaxdiff.configs``); each docstring gives its command."""
