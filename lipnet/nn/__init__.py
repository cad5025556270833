"""1-Lipschitz layers on the ``lipnet.ortho`` core, their sound Lipschitz bounds, and exact export.

Layers: ``OrthoLinear``, ``OrthoConv1d`` (1-D BCOP), ``OrthoConv2d`` (AOC via orthogonium, our core inside), ``OrthoConvTranspose2d``, ``AOLLinear``,
``AOLConv2d``, ``SLLBlock``, ``ConvexPotentialLayer`` (CPL); activations ``MaxMin``, ``Abs``, ``GroupSort``, ``FullSort``, ``HouseHolder``, ``LPReLU``; pooling ``L2NormPool2d``,
``ScaledAvgPool2d``, ``GlobalL2NormPool2d``; glue ``InputNormalization``, ``L2BallProjection``, ``Flatten``, ``FirstChannels``, ``BatchCentering``,
``LayerCentering``, ``ConvexResidual``, ``ConcatResidual``, ``L2NormResidual``, ``PrescaledAdditiveResidual``; fixed features ``Scattering2d`` (wavelet scattering); losses ``LipschitzCrossEntropy``, ``MultiMarginHinge``, ``KRLoss``, ``HingeMarginLoss``, ``HKRLoss``, ``SoftHKRLoss``, ``LseHKRLoss``, ``TauCrossEntropyLoss``, ``TauBCEWithLogitsLoss``,
``ClippedLossGradient`` (per-sample logit-gradient clipping, for private training).
Parametrizations of a plain ``nn.Linear`` / ``nn.Conv2d``: ``orthogonal(module)``, ``aol(module)``.
Bounds: ``lipschitz_bound(module)``, per layer ``lipschitz_report(model, x)``; export: ``export(model)``; ``retract_(module)``: every stored
orthogonal factor back onto the orthogonal matrices now (the layers also do it on their own after
every change in eager mode; ``retract_after_step(optimizer, module)`` does it for a compiled module).
"""

from ._checks import input_checks_enabled, set_input_checks
from .activations import Abs, FullSort, GroupSort, HouseHolder, LPReLU, MaxMin
from .bounds import lipschitz_bound
from .centering import BatchCentering, LayerCentering
from .conv import AOLConv2d, OrthoConv2d, OrthoConvTranspose2d
from .conv1d import OrthoConv1d
from .conv_norm import conv_operator_norm_bound
from .cpl import ConvexPotentialLayer
from .export import export, register_exporter
from .linear import AOLLinear, OrthoLinear
from .normalization import GroupNormalization, InputNormalization, L2BallProjection
from .hkr import (HingeMarginLoss, HKRLoss, KRLoss, LseHKRLoss, NegKRLoss, SoftHKRLoss, TauBCEWithLogitsLoss,
                  TauCrossEntropyLoss)
from .losses import ClippedLossGradient, LipschitzCrossEntropy, MultiMarginHinge
from .parametrizations import aol, core_ortho_params, orthogonal, retract_, retract_after_step
from .pooling import FirstChannels, Flatten, GlobalL2NormPool2d, InvertibleDownSampling, InvertibleUpSampling, L2NormPool2d, ScaledAvgPool2d
from .report import LayerBound, LipschitzReport, lipschitz_lower_bound, lipschitz_report
from .residual import ConcatResidual, ConvexResidual, L2NormResidual, PrescaledAdditiveResidual
from .scattering import Scattering2d
from .sll import SLLBlock

__all__ = [
    "AOLConv2d", "AOLLinear", "Abs", "BatchCentering", "ClippedLossGradient", "ConcatResidual", "ConvexPotentialLayer", "ConvexResidual", "FirstChannels", "Flatten",
    "FullSort", "GroupSort", "HouseHolder", "LPReLU", "PrescaledAdditiveResidual",
    "GlobalL2NormPool2d", "GroupNormalization", "InputNormalization", "L2NormResidual", "InvertibleDownSampling", "InvertibleUpSampling", "L2BallProjection", "L2NormPool2d", "LayerCentering", "LipschitzCrossEntropy", "MaxMin",
    "HKRLoss", "HingeMarginLoss", "KRLoss", "MultiMarginHinge", "NegKRLoss", "TauCrossEntropyLoss", "LseHKRLoss", "SoftHKRLoss", "TauBCEWithLogitsLoss", "OrthoConv1d", "OrthoConv2d", "OrthoConvTranspose2d", "OrthoLinear", "SLLBlock", "Scattering2d", "ScaledAvgPool2d",
    "LayerBound", "LipschitzReport", "conv_operator_norm_bound", "core_ortho_params", "export", "lipschitz_bound",
    "lipschitz_lower_bound", "lipschitz_report", "register_exporter",
    "aol", "input_checks_enabled", "orthogonal", "retract_", "retract_after_step", "set_input_checks",
]
