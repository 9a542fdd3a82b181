"""Triton kernels of the custom ops. Import the op modules directly (models.ops.triton.hstu_attention):
this package imports nothing, so importing models.ops never decorates a kernel early."""
