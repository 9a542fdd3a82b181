"""Raw data into the warehouse: MovieLens-100K (from a folder or a verified download) and a user's own
events/users/items files, validated and published as the source tables of docs/data-contracts.md."""

from recsys.ingest.events import EventSchema, IngestReport, RejectedRow, ingest_events
from recsys.ingest.movielens import (
    MovieLensFormatError,
    MovieLensFrames,
    download_movielens_100k,
    ingest_movielens,
    load_movielens_100k,
)
from recsys.ingest.schema import IngestError, SchemaError

__all__ = [
    "EventSchema",
    "IngestError",
    "IngestReport",
    "MovieLensFormatError",
    "MovieLensFrames",
    "RejectedRow",
    "SchemaError",
    "download_movielens_100k",
    "ingest_events",
    "ingest_movielens",
    "load_movielens_100k",
]
