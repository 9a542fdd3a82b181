"""Entry point: ``.venv/bin/recsys dashboard`` (or ``streamlit run recsys/dashboard/app.py``), on 127.0.0.1.

The sidebar chooses the warehouse file (default: ``RECSYS_WAREHOUSE`` or ``$RECSYS_HOME/warehouse.duckdb``)
and ``st.navigation`` runs one of the pages in ``recsys/dashboard/views/``; they read the path from session
state. The folder is deliberately not called ``pages/``: Streamlit treats a ``pages/`` folder beside the
entry script as a v1 multipage app and runs its files directly, bypassing this script (and its sidebar).

Viewer mode: ``client.toolbarMode = "viewer"`` in ``.streamlit/config.toml`` beside this script (Streamlit
reads a script-level config whatever the working directory) hides the Deploy button and the developer menu;
it is also set here, for a server started with another config.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

# `streamlit run recsys/dashboard/app.py` puts recsys/dashboard/ on sys.path, not the repository root.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

import recsys.core  # noqa: E402,F401  (environment defaults: telemetry off, BENTOML_HOME under RECSYS_HOME)
from recsys.dashboard import data  # noqa: E402

st.set_option("client.toolbarMode", "viewer")
st.set_page_config(
    page_title="recsys platform",
    page_icon=":material/insights:",
    layout="wide",
    menu_items={
        "Get help": None,
        "Report a bug": None,
        "About": "recsys platform: runs, models, data, evidence.",
    },
)


@st.cache_resource(show_spinner=False)
def _warm_up() -> threading.Thread:
    """Import what the Evidence and User pages need (SciPy; PyTorch, BentoML and the model registry) in the
    background, once per server process, so that the first visit to those pages does not wait for it."""

    def work() -> None:
        import scipy.stats  # noqa: F401

        import recsys.dashboard.recommend  # noqa: F401
        import recsys.serving.registry  # noqa: F401

    thread = threading.Thread(target=work, name="dashboard-warm-up", daemon=True)
    thread.start()
    return thread


_warm_up()
if "warehouse_path" not in st.session_state:
    st.session_state["warehouse_path"] = str(data.default_warehouse_path())
st.sidebar.text_input(
    "Warehouse (DuckDB file)",
    key="warehouse_path",
    help=f"Default: ${data.WAREHOUSE_ENV}, else $RECSYS_HOME/warehouse.duckdb. Opened read-only per query.",
)
path = Path(st.session_state["warehouse_path"]).expanduser()
if not path.is_file():
    st.sidebar.warning(f"No warehouse file at `{path}` yet.")

pages = st.navigation(
    {
        "Experiments": [
            st.Page("views/runs.py", title="Runs", icon=":material/list_alt:", default=True),
            st.Page("views/offline.py", title="Offline comparison", icon=":material/bar_chart:"),
            st.Page("views/evidence.py", title="Evidence", icon=":material/fact_check:"),
            st.Page("views/ab_results.py", title="A/B results", icon=":material/science:"),
            st.Page("views/continual.py", title="Continual training", icon=":material/update:"),
        ],
        "Data and models": [
            st.Page("views/dataset.py", title="Dataset", icon=":material/database:"),
            st.Page("views/user.py", title="User", icon=":material/person:"),
            st.Page("views/serving.py", title="Serving", icon=":material/speed:"),
        ],
    }
)
try:
    pages.run()
except data.WarehouseBusy as exc:
    st.warning(str(exc))
except data.ContractError as exc:
    st.error(str(exc))
