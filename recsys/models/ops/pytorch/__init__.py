"""Pure-PyTorch reference implementations of the custom ops (readable definitions; the CPU path)."""

from recsys.models.ops.pytorch.hstu_attention import (
    hstu_attention_reference,
    time_bucket,
    time_bucket_thresholds,
)

__all__ = ["hstu_attention_reference", "time_bucket", "time_bucket_thresholds"]
