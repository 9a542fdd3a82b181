"""The generator-backed retriever of the service: ``/recommend`` through semantic-ID generation.

A registered ``genret`` model (``models.generative_retrieval.ServedGenerator``: the generator with its items'
semantic IDs) is served by ``GenerativeRuntime``, which stands where the engine's other retrievers stand:

- ``score_all`` runs constrained beam search (prefix trie of the real codes, so only real items come out)
  over each user's history and gives every generated item its sequence log-probability; items not
  generated get -inf, so the engine's exact top-N pool holds only generated items (history and excluded
  items are then removed by the engine as for any retriever). The beam width is the service's
  ``beam_width`` when set (``RECSYS_SERVING_BEAM_WIDTH``), else the one the model was registered with.
- ``score_candidates`` (``/rank``) scores each candidate by its exact sequence log-probability under the
  generator (teacher-forced over its codes), no search.

Responses say ``scored_by: beam-search``. Histories are read in the model's item index, most recent
``max_items`` items (what the generator was trained to read).
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.models.generative_retrieval import ServedGenerator
from recsys.serving.registry import LoadedModel
from recsys.serving.service import MappedHistory, ModelRuntime


def is_generative(loaded: LoadedModel) -> bool:
    return isinstance(loaded.module, ServedGenerator)


class GenerativeRuntime(ModelRuntime):
    """A loaded ``ServedGenerator`` with the catalogue lookups of ``ModelRuntime`` and generation-based
    scoring; ``beam`` None = the registered width."""

    def __init__(self, loaded: LoadedModel, device: torch.device, beam: int | None = None) -> None:
        module = loaded.module
        if not isinstance(module, ServedGenerator):
            raise ValueError(f"{loaded.tag}: {loaded.card.architecture} is not a generative retriever")
        # ModelRuntime.__init__ accepts only vector-scoring models: its catalogue state is set here instead.
        self.featurizer = None
        self.ranker_rows = 0
        self.unique_pooling = False
        self.loaded, self.tag, self.card, self.catalog = loaded, loaded.tag, loaded.card, loaded.catalog
        self.device = device
        self.module = module.to(device).eval()
        module.sync()
        self.generator: ServedGenerator = module
        self.beam = int(beam or module.config.beam)
        self.tasks = tuple(loaded.card.tasks)
        self._index_catalogue(loaded.catalog.item_ids[1:])
        self.prior = torch.log1p(
            torch.as_tensor(loaded.catalog.popularity, dtype=torch.float32, device=device)
        )
        self.prior[0] = float("-inf")
        self._category_masks: dict[tuple[str, ...], torch.Tensor] = {}
        self.mfalcon = None
        self.item_table = None  # no item vectors: the IVF index never applies
        self.ann = None
        self.max_history = module.config.generator.max_items

    @property
    def is_popularity(self) -> bool:
        return False

    @property
    def scored_by(self) -> str:  # type: ignore[override]
        return "beam-search"

    def _recent(self, histories: list[MappedHistory]) -> list[np.ndarray]:
        return [np.asarray(h.idx[-self.max_history :], dtype=np.int64) for h in histories]

    @torch.inference_mode()
    def score_all(self, histories: list[MappedHistory], request_ts: np.ndarray) -> torch.Tensor:
        """[B, N + 1]: the sequence log-probability of each item beam search generated, -inf elsewhere."""
        result = self.generator.recommend(self._recent(histories), self.beam)
        scores = torch.full((len(histories), self.catalog.num_items + 1), float("-inf"), device=self.device)
        for row, (items, logps) in enumerate(zip(result.items, result.scores, strict=True)):
            if items:
                idx = torch.as_tensor(items, dtype=torch.long, device=self.device)
                scores[row, idx] = torch.as_tensor(logps, dtype=torch.float32, device=self.device)
        return scores

    @torch.inference_mode()
    def score_candidates(
        self, histories: list[MappedHistory], request_ts: np.ndarray, candidates: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """candidates [B, M] item_idx (0 = padding or unknown: 0) -> {task: [B, M]} log-probabilities."""
        items = candidates.cpu().numpy()
        logp = self.generator.sequence_logp(self._recent(histories), items).to(self.device)
        logp = logp.masked_fill(candidates == 0, 0.0)
        return {task: logp for task in self.tasks}
