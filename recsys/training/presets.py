"""Training budgets of the pipeline's quick profile, named once.

The pipeline flow (``flows.pipeline.PipelineConfig``) trains with them, and whatever rebuilds the pipeline's
models outside the flow uses the same objects: the A/B simulator's arms (``simulation.arms``) reuse the
pipeline's checkpoints, whose cache keys include the loop config, and logic never imports the orchestration
layer to learn them.
"""

from __future__ import annotations

from recsys.training.loop import LoopConfig

#: The retrieval stage's loop in the quick profile: capped epochs, early stop on validation NDCG@10.
QUICK_RETRIEVAL_LOOP = LoopConfig(max_epochs=20, patience=3, progress=False)
