"""The feature layer: dense indexes, per-user sequences, leave-one-out and temporal splits, point-in-time
ranking examples, and the Parquet exports the models read (docs/data-contracts.md, "Feature tables").

Every build step takes the warehouse and a dataset name, is cached on its inputs' versions and parameters,
and returns the ``TableVersion`` it published (or found fresh).
"""

from recsys.features.config import FeatureConfig
from recsys.features.export import (
    export_features,
    latest_export,
    read_examples,
    read_manifest,
    read_sequences,
)
from recsys.features.point_in_time import build_examples, feature_columns
from recsys.features.sequences import (
    build_item_index,
    build_sequences,
    build_user_index,
    load_sequences,
    num_items,
    num_users,
)
from recsys.features.splits import build_split_loo

__all__ = [
    "FeatureConfig",
    "build_examples",
    "build_item_index",
    "build_sequences",
    "build_split_loo",
    "build_user_index",
    "export_features",
    "feature_columns",
    "latest_export",
    "load_sequences",
    "num_items",
    "num_users",
    "read_examples",
    "read_manifest",
    "read_sequences",
]
