"""Pageant: serve large language models on Kubernetes.

Subpackages: ``pageant.engine`` (the inference engine and its HTTP server, needs torch),
``pageant.kernels`` (Triton kernels and their PyTorch references) and ``pageant.operator``
(the kopf operator, no torch).
"""

__version__ = "0.1.0"
