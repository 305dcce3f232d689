"""Drafters: the interface every drafter implements, and the registry that loads them by name or folder."""

from dspark.models.drafters.base import DraftInput, DraftProposal, Drafter
from dspark.models.drafters.registry import compile_drafter, load_drafter, register_drafter

__all__ = ["DraftInput", "DraftProposal", "Drafter", "compile_drafter", "load_drafter", "register_drafter"]
