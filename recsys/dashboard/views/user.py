"""User: one user by their own id -- profile, history with item attributes and times, and side by side what
each packaged retriever and the ranker recommend for them now, with the running service's answer when its
URL is set. Models come from the BentoML model store through ``recsys.serving.registry`` (CPU)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import streamlit as st

from recsys.dashboard import cache, data, explore, recommend

POOL = 100  # retriever candidates the ranker re-scores (the service's default pool size)
SELECT_LIMIT = 50_000  # above this many users, the id is typed instead of picked from a list


@st.cache_data(show_spinner=False, ttl=30)
def _registered() -> list[dict[str, Any]]:
    return recommend.list_registered()


@st.cache_resource(show_spinner="Loading the model from the store...", max_entries=16)
def _model(tag: str) -> Any:
    return recommend.load(tag)


@st.cache_data(show_spinner=False, max_entries=256)
def _retrieve(tag: str, ids: tuple[int, ...], ts: tuple[int, ...], request_ts: int, k: int) -> pl.DataFrame:
    return recommend.retrieve(_model(tag), ids, ts, request_ts, k)


@st.cache_data(show_spinner=False, max_entries=256)
def _rank(
    tag: str,
    user_id: int,
    ids: tuple[int, ...],
    ts: tuple[int, ...],
    request_ts: int,
    candidates: tuple[int, ...],
    k: int,
) -> pl.DataFrame:
    return recommend.rank(_model(tag), user_id, ids, ts, request_ts, candidates, k)


def _pick_user(users: pl.DataFrame, column: Any) -> int | None:
    """A searchable list of the users (most active first); the choice is kept in the URL (``?user=``)."""
    wanted = st.query_params.get("user")
    ids = users["user_id"].to_list()
    if len(ids) > SELECT_LIMIT:
        text = column.text_input("User id", value=wanted or str(ids[0]), key="user_id_text")
        try:
            user = int(text)
        except ValueError:
            st.error(f"User id: {text!r} is not an integer id")
            return None
        if user not in set(ids):
            st.error(f"User id: no user {user} in this dataset")
            return None
    else:
        events = dict(zip(ids, users["events"].to_list(), strict=True))
        raw = dict(zip(ids, users["raw_id"].to_list(), strict=True))
        index = (
            ids.index(int(wanted)) if wanted and wanted.lstrip("-").isdigit() and int(wanted) in events else 0
        )
        user = column.selectbox(
            "User (type an id to search)",
            ids,
            index=index,
            format_func=lambda u: f"{u}{f' ({raw[u]})' if raw[u] else ''} · {events[u]} events",
            key="user_pick",
        )
    st.query_params["user"] = str(user)
    return int(user)


def _with_attributes(frame: pl.DataFrame, attributes: pl.DataFrame) -> pl.DataFrame:
    extra = [c for c in attributes.columns if c != "item_id" and c not in frame.columns]
    return frame.join(attributes.select("item_id", *extra), on="item_id", how="left", maintain_order="left")


def _show_list(title: str, caption: str, frame: pl.DataFrame, path: Path, dataset: str) -> None:
    st.markdown(f"**{title}**")
    st.caption(caption)
    if frame.is_empty():
        st.caption("Nothing to recommend.")
        return
    attributes = cache.read(explore.item_attributes, path, dataset, frame["item_id"].to_list())
    shown = _with_attributes(frame, attributes)
    st.dataframe(
        shown,
        hide_index=True,
        column_config={
            c: st.column_config.NumberColumn(format="%.4f")
            for c in shown.columns
            if c == "score" or c.startswith("p(")
        },
    )


def _served(url: str, user: int, k: int, path: Path, dataset: str) -> None:
    try:
        response = recommend.served(url, user, k, api_key=os.environ.get(recommend.API_KEY_ENV))
    except OSError as exc:
        st.warning(f"The service at {url} did not answer: {exc}")
        return
    items = pl.DataFrame(
        response.get("items") or [],
        schema={"item_id": pl.Int64, "score": pl.Float64, "position": pl.Int64, "propensity": pl.Float64},
    )
    models = response.get("models") or {}
    caption = f"source: {response.get('source')} · retriever {models.get('retriever')}"
    if models.get("ranker"):
        caption += f" · ranker {models['ranker']}"
    if response.get("cold_start"):
        caption += f" · cold start: {response['cold_start']}"
    _show_list(f"Served by {url}", caption, items.with_columns(rank=pl.col("position") + 1), path, dataset)


def main() -> None:
    path = Path(st.session_state.get("warehouse_path") or data.default_warehouse_path())
    st.title("User")
    found = cache.read(explore.datasets, path)
    if not found:
        where = "this warehouse" if path.is_file() else f"`{path}` (the file does not exist yet)"
        st.info(
            f"No dataset in {where}. `.venv/bin/recsys pipeline` generates a synthetic one (or ingests "
            "MovieLens or your own events), trains and packages the models; then pick a user here."
        )
        return
    top = st.columns([1, 3, 1])
    dataset = top[0].selectbox("Dataset", found, key="user_dataset")
    users = cache.read(explore.users, path, dataset)
    if users.is_empty():
        st.info(f"Dataset `{dataset}` has no events yet.")
        return
    user = _pick_user(users, top[1])
    if user is None:
        return
    k = top[2].number_input("Top k", min_value=1, max_value=100, value=10, step=1, key="user_k")

    history = cache.read(explore.user_history, path, dataset, user)
    profile = cache.read(explore.user_profile, path, dataset, user)
    row = users.filter(pl.col("user_id") == user).row(0, named=True)
    first = datetime.fromtimestamp(row["first_ts"], UTC).strftime("%Y-%m-%d %H:%M")
    last = datetime.fromtimestamp(row["last_ts"], UTC).strftime("%Y-%m-%d %H:%M")
    st.subheader(f"User {user}" + (f" ({row['raw_id']})" if row["raw_id"] else ""))
    about = " · ".join(f"{k_}: {v}" for k_, v in profile.items() if k_ != "user_id" and v is not None)
    st.caption(f"{row['events']} events from {first} to {last} UTC" + (f" · {about}" if about else ""))

    st.header("History")
    st.caption("Oldest first, as the models read it; item attributes from the dataset's `items` table.")
    st.dataframe(
        history.drop("ts"),
        hide_index=True,
        height=min(420, 38 + 35 * history.height),
        column_config={"time": st.column_config.DatetimeColumn("time (UTC)", format="YYYY-MM-DD HH:mm:ss")},
    )

    st.header("Recommendations")
    request_ts = int(row["last_ts"]) + 1
    versions = cache.read(explore.dataset_versions, path, dataset)
    try:
        models = recommend.packaged_models(_registered(), versions)
    except Exception as exc:  # noqa: BLE001 - the store's own error, shown as is
        st.error(f"The model store could not be read: {exc}")
        models = []
    if not models:
        st.info(
            f"No packaged model of `{dataset}` in the model store (`$BENTOML_HOME`, under `$RECSYS_HOME`). "
            "`.venv/bin/recsys pipeline` trains, registers and packages them."
        )
    else:
        ids = tuple(int(i) for i in history["item_id"].to_list())
        ts = tuple(int(t) for t in history["ts"].to_list())
        st.caption(
            f"Each model's top {k} right after the user's last event ({last} UTC), from the whole stored "
            "history; items the user already has are left out. The ranker re-orders the served "
            f"retriever's top {POOL}."
        )
        retrievers = [m for m in models if m.task == "retrieval"]
        rankers = [m for m in models if m.task == "ranking"]
        served_name = next((m.name for m in retrievers if m.name.endswith("-retriever")), None)
        served_name = served_name or next(
            (m.name for m in retrievers if m.architecture != "popularity"), None
        )
        cols = st.columns(len(retrievers) + len(rankers))
        pool: tuple[int, ...] = ()
        for col, m in zip(cols, retrievers, strict=False):
            with col:
                top_k = _retrieve(m.tag, ids, ts, request_ts, int(k))
                if m.name == served_name:
                    pool = tuple(_retrieve(m.tag, ids, ts, request_ts, POOL)["item_id"].to_list())
                note = " · served retriever" if m.name == served_name else ""
                _show_list(m.label, f"{m.tag.split(':', 1)[1]}{note}", top_k, path, dataset)
        for col, m in zip(cols[len(retrievers) :], rankers, strict=True):
            with col:
                if not pool:
                    st.markdown(f"**{m.label}**")
                    st.caption("No served retriever to take candidates from.")
                    continue
                ranked = _rank(m.tag, user, ids, ts, request_ts, pool, int(k))
                _show_list(
                    m.label,
                    f"{m.tag.split(':', 1)[1]} · ranks {served_name}'s top {POOL}",
                    ranked,
                    path,
                    dataset,
                )

    st.header("Served response")
    url = st.text_input(
        "Service URL",
        value=os.environ.get(recommend.SERVICE_URL_ENV, ""),
        key="service_url",
        help=f"The running recommendation service (`.venv/bin/recsys serve`: http://127.0.0.1:3000); default "
        f"${recommend.SERVICE_URL_ENV}. The API key, if the service wants one, is ${recommend.API_KEY_ENV}.",
    )
    if url:
        _served(url, user, int(k), path, dataset)
    else:
        st.caption(
            "No service URL set: start the service with `.venv/bin/recsys serve` and enter its URL (or set "
            f"${recommend.SERVICE_URL_ENV}) to see what it answers for this user."
        )


main()
