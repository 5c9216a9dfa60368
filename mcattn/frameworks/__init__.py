"""Thin adapters for deep-learning frameworks (import the one you need).

``mcattn.frameworks.torch``: methods on torch tensors and inside transformers models.
Plain calls on torch, JAX or TensorFlow tensors need no adapter: every mcattn function
accepts them through DLPack and returns the same framework's tensors.
"""
