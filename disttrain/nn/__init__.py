"""Layers as forward/backward pairs (Module protocol in module.py), losses and initialisers."""
from .activations import GELU, ReLU, Sigmoid, Tanh
from .attention import Attention, MultiHeadAttention
from .dropout import Dropout
from .embedding import Embedding
from .gradcheck import GradcheckReport, gradcheck
from .init import kaiming_uniform, xavier_uniform
from .layernorm import LayerNorm
from .linear import Linear
from .lstm import LSTM
from .losses import MSE, BCEWithLogits, SoftmaxCrossEntropy
from .module import Module, Parameter, Sequential

__all__ = ["Module", "Parameter", "Sequential", "Linear", "ReLU", "GELU", "Tanh", "Sigmoid", "Dropout",
           "LayerNorm", "Embedding", "LSTM", "Attention", "MultiHeadAttention", "SoftmaxCrossEntropy", "BCEWithLogits", "MSE", "kaiming_uniform",
           "xavier_uniform", "gradcheck", "GradcheckReport"]
