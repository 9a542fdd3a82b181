"""Synthetic recommendation data with known ground truth.

from recsys.synthetic import SyntheticConfig, generate, load_into_warehouse, oracle_auc
manifest = generate(SyntheticConfig.quick(), Path("var/synthetic/quick"))
load_into_warehouse(wh, manifest)                       # synthetic.users/items/impressions/events
ClickModel(manifest.config).probability(state, item_ids, ts, position)   # the true P(click)
"""

from recsys.synthetic.click_model import Catalogue, ClickModel, UserState
from recsys.synthetic.config import SyntheticConfig
from recsys.synthetic.generator import SyntheticManifest, auc, generate, oracle_auc, read_manifest
from recsys.synthetic.policy import plackett_luce_slate
from recsys.synthetic.warehouse_load import load_into_warehouse

__all__ = [
    "Catalogue",
    "ClickModel",
    "SyntheticConfig",
    "SyntheticManifest",
    "UserState",
    "auc",
    "generate",
    "load_into_warehouse",
    "oracle_auc",
    "plackett_luce_slate",
    "read_manifest",
]
