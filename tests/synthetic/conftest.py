"""One quick-preset run shared by the synthetic tests (generating it takes a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.synthetic.config import SyntheticConfig
from recsys.synthetic.generator import SyntheticManifest, generate


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> SyntheticManifest:
    return generate(SyntheticConfig.quick(), Path(tmp_path_factory.mktemp("synthetic-quick")))
