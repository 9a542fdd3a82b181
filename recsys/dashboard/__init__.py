"""The Streamlit dashboard: runs, offline model comparison, simulated A/B results and serving latency.

Start it with ``.venv/bin/streamlit run dashboard/app.py`` (binds 127.0.0.1, see ``.streamlit/config.toml``).
It only ever reads the warehouse (``dashboard.data`` opens the DuckDB file read-only for each query and closes
it at once), so it never locks out a training run or a flow that writes.
"""
