"""Custom ops, one op in three files: ``ops/<op>.py`` validates and dispatches, ``ops/pytorch/`` holds the
reference and ``ops/triton/`` the kernel, imported lazily: nothing here needs or touches a GPU at import."""

from recsys.models.ops.hstu_attention import Backend, hstu_attention

__all__ = ["Backend", "hstu_attention"]
