"""Token-reduction methods, one file each, and their registry."""
from vtprune.methods.base import (
    REGISTRY,
    Method,
    Param,
    get_method,
    register,
    scaled_layer,
    support_matrix,
    support_table,
    supported_methods,
)
from vtprune.methods.atp import ATP
from vtprune.methods.csp import CSP
from vtprune.methods.divprune import DivPrune
from vtprune.methods.fastervlm import FasterVLM
from vtprune.methods.fastv import FastV
from vtprune.methods.feather import Feather
from vtprune.methods.hired import HiRED
from vtprune.methods.mustdrop import MustDrop, MustDropDecode, MustDropPrefill, MustDropVision
from vtprune.methods.pyramiddrop import PyramidDrop
from vtprune.methods.selection import GridPool, RandomKeep, UniformKeep
from vtprune.methods.tome import ToMe

__all__ = [
    "ATP",
    "CSP",
    "REGISTRY",
    "DivPrune",
    "FastV",
    "Feather",
    "FasterVLM",
    "GridPool",
    "HiRED",
    "Method",
    "MustDrop",
    "MustDropDecode",
    "MustDropPrefill",
    "MustDropVision",
    "Param",
    "PyramidDrop",
    "RandomKeep",
    "ToMe",
    "UniformKeep",
    "get_method",
    "register",
    "scaled_layer",
    "support_matrix",
    "support_table",
    "supported_methods",
]
