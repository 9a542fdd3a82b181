"""Ranking examples from implicit feedback: ``<ds>.implicit_examples``.

A click log has users, items and times but no label. Every interaction (of ``positive_events``, default
all) is a positive example; for each, ``ImplicitConfig.negatives`` items are sampled from the catalogue as
it was known strictly before the interaction, and become negative examples at the same ``ts``. The table
is the example source ``point_in_time.build_examples`` reads when ``FeatureConfig.examples`` is
``implicit`` (or ``auto`` on a log without values or impressions); the behavioural features of positives
and negatives then come from events strictly before ``ts``, as for every example.

Columns: ``request_id`` (the positive's rank in the ``(ts, src_row)`` event order: one group per
interaction), ``user_id``, ``item_id``, ``ts``, ``candidate`` (0 = the interacted item, 1..k = the sampled
negatives; never a model input) and ``label`` (BOOLEAN).

Sampling (``ImplicitConfig.sampling``), over events sorted by ``(ts, src_row)``:

- ``popularity`` (default): a negative is the item of an event drawn uniformly from all events strictly
  before the positive's ``ts``, i.e. items in proportion to their interaction count so far. Popular items
  are the hard negatives a ranker meets after retrieval, and the counts use no future event.
- ``uniform``: every item whose first event is strictly before ``ts`` is equally likely (long-tail items
  as often as hits: easier negatives, closer to ranking the whole catalogue).

Both draw with replacement. A draw equal to the positive's item is redrawn (up to ``_REDRAWS`` rounds) and
dropped if it still collides; interactions with nothing before them (the start of the log) keep their
positive and get no negative. Only the positive item itself is excluded: an item the user interacts with at
another time may be drawn as a negative here (the usual sampled-negative noise; excluding it would read the
user's future). The sampler is a seeded ``numpy`` Generator consumed in the fixed event order, so the same
events and config always give the same table.

When the data has impressions (what was shown), exposure gives real negatives instead: the impressions
example source (the unclicked impressions), which ``auto`` prefers.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recsys.core.hashing import stable_hash
from recsys.features.config import ImplicitConfig
from recsys.features.sequences import EVENT_COLUMNS, check_dataset, require_table
from recsys.warehouse import TableVersion, Warehouse, WarehouseError

IMPLICIT_VERSION = "implicit/1"
# Rounds of redrawing negatives that hit the positive's own item; what still collides is dropped.
_REDRAWS = 8


def sample_negatives(
    item: np.ndarray, ts: np.ndarray, positive: np.ndarray, config: ImplicitConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Negatives for the positive events, from events sorted by ``(ts, src_row)``.

    ``item``/``ts`` are every event in that order, ``positive`` the indices of the positive events
    (ascending). Returns ``(owner, neg_item)``: for each kept negative, the index into ``positive`` of the
    interaction it belongs to, and the sampled item; grouped by owner, in draw order.
    """
    rng = np.random.default_rng(config.seed)
    k = config.negatives
    p_ts = ts[positive]
    if config.sampling == "popularity":
        pool = item
        n_before = np.searchsorted(ts, p_ts, side="left")  # events strictly before the positive
    else:
        seen, first = np.unique(item, return_index=True)  # first occurrence: events are in time order
        order = np.argsort(first, kind="stable")
        pool = seen[order]
        n_before = np.searchsorted(ts[first[order]], p_ts, side="left")  # items first seen before ts
    owner = np.repeat(np.arange(len(positive), dtype=np.int64), k)
    size = n_before[owner]
    draw = np.floor(rng.random(len(owner)) * size).astype(np.int64)
    keep = size > 0
    neg = np.full(len(owner), -1, dtype=np.int64)
    neg[keep] = pool[draw[keep]]  # draw < size <= len(pool)
    own_item = item[positive][owner]
    for _ in range(_REDRAWS):
        hit = np.flatnonzero(keep & (neg == own_item))
        if len(hit) == 0:
            break
        redraw = np.floor(rng.random(len(hit)) * size[hit]).astype(np.int64)
        neg[hit] = pool[redraw]
    keep &= neg != own_item
    return owner[keep], neg[keep]


def implicit_examples(events: pa.Table, config: ImplicitConfig) -> pa.Table:
    """The example rows of ``events`` (user_id, item_id, ts, event; sorted by ts, src_row)."""
    user = np.asarray(events["user_id"].to_numpy(), dtype=np.int64)
    item = np.asarray(events["item_id"].to_numpy(), dtype=np.int64)
    ts = np.asarray(events["ts"].to_numpy(), dtype=np.int64)
    if config.positive_events:
        kinds = np.asarray(events["event"].to_numpy(zero_copy_only=False), dtype=object)
        positive = np.flatnonzero(np.isin(kinds, list(config.positive_events)))
    else:
        positive = np.arange(len(item), dtype=np.int64)
    owner, neg = sample_negatives(item, ts, positive, config)
    # Group rows by interaction: the positive (candidate 0), then its negatives (1..k in draw order).
    n_neg = np.bincount(owner, minlength=len(positive))
    starts = np.cumsum(n_neg) - n_neg
    rank = np.arange(len(owner)) - np.repeat(starts, n_neg) + 1
    rows_owner = np.concatenate([np.arange(len(positive), dtype=np.int64), owner])
    cand = np.concatenate([np.zeros(len(positive), dtype=np.int32), rank.astype(np.int32)])
    order = np.lexsort((cand, rows_owner))
    rows_owner, cand = rows_owner[order], cand[order]
    at = positive[rows_owner]
    items = np.concatenate([item[positive], neg])[order]
    return pa.table(
        {
            "request_id": pa.array(at),
            "user_id": pa.array(user[at]),
            "item_id": pa.array(items),
            "ts": pa.array(ts[at]),
            "candidate": pa.array(cand),
            "label": pa.array(cand == 0),
        }
    )


def build_implicit_examples(wh: Warehouse, dataset: str, config: ImplicitConfig) -> TableVersion:
    """Publish ``<ds>.implicit_examples`` from ``<ds>.events`` (skipped while its inputs are unchanged)."""
    check_dataset(dataset)
    ev = f"{dataset}.events"
    inputs = {ev: require_table(wh, ev, EVENT_COLUMNS)}
    params = {"step": "implicit_examples", "version": IMPLICIT_VERSION, **config.model_dump(mode="json")}
    name = f"{dataset}.implicit_examples"
    if wh.is_fresh(name, stable_hash(inputs, params)):
        latest = wh.latest(name)
        assert latest is not None  # is_fresh implies a lineage row
        return latest
    events = wh.con.sql(
        f"SELECT user_id, item_id, ts, event, src_row FROM {ev} ORDER BY ts, src_row"
    ).to_arrow_table()
    table = implicit_examples(events, config)
    if not len(table):
        wanted = list(config.positive_events) or "any"
        raise WarehouseError(f"{ev} has no event of type {wanted}: no implicit-feedback examples to build")
    return wh.publish(name, table, inputs=inputs, params=params)
