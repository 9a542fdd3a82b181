"""Distillation on a tiny synthetic warehouse: unlabelled candidates are items the user never saw, with the
candidate's attributes and the example's context; the teacher scores are published once (fresh = skipped,
new teacher weights = recomputed) and line up with the data; the task's loss is ``distillation_loss``; a
distilled student moves toward the teacher and its run is recorded as kind 'distill'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.models.deepfm import DeepFM, DeepFMConfig
from recsys.models.losses import distillation_loss
from recsys.training.checkpoint import save_weights, weights_path
from recsys.training.distillation import (
    DistillationTask,
    DistillConfig,
    TeacherMember,
    TeacherScoreConfig,
    candidate_arrays,
    item_lookup,
    load_teacher_scores,
    precompute_teacher_scores,
    sample_candidates,
    score_logits,
    train_distilled,
)
from recsys.training.loop import LoopConfig, OptimizerConfig
from recsys.training.ranking import (
    RankingData,
    RankingDataConfig,
    RankingTask,
    RankingTrainConfig,
    load_ranking_data,
)
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog

DATA = RankingDataConfig(max_train_examples=300, max_valid_examples=120, max_test_examples=150)
MAX_LEN = 16


@pytest.fixture(scope="module")
def data(synthetic_wh: Path) -> RankingData:
    with Warehouse(synthetic_wh) as wh:
        return load_ranking_data(wh, "syn", DATA)


def _teacher(data: RankingData, tmp: Path, seed: int) -> TeacherMember:
    torch.manual_seed(seed)
    model = DeepFM(DeepFMConfig(features=data.feature_spec(MAX_LEN)))
    ckpt = tmp / f"teacher-{seed}"
    save_weights(model, weights_path(ckpt, "best"))
    return TeacherMember.from_checkpoint("deepfm", model, MAX_LEN, ckpt)


def test_candidates_are_unseen_items_with_their_own_attributes(data: RankingData) -> None:
    train = data.splits["train"]
    k = 3
    items = sample_candidates(data, train, k, seed=1)
    assert items.shape == (len(train), k)
    assert np.array_equal(items, sample_candidates(data, train, k, seed=1))  # seeded
    seen: dict[int, set[int]] = {}
    for s in data.splits.values():
        for u, i in zip(s.user.tolist(), s.item.tolist(), strict=True):
            seen.setdefault(u, set()).add(i)
    h = data.histories
    for u in np.unique(train.user).tolist():
        seen.setdefault(u, set()).update(
            h.item[h.user_start[u] : h.user_start[u] + h.user_length[u]].tolist()
        )
    lookup = item_lookup(data)
    for b in range(len(train)):
        user = int(train.user[b])
        assert not set(items[b].tolist()) & seen[user], f"example {b} got a candidate the user saw"
    assert lookup.known[items].all()

    rows = np.repeat(np.arange(len(train)), k)
    cand = candidate_arrays(train, rows, items.reshape(-1), lookup, data.dense_names)
    assert np.array_equal(cand.user, train.user[rows]) and np.array_equal(cand.ts, train.ts[rows])
    assert np.array_equal(cand.seq_offset, train.seq_offset[rows])
    assert np.array_equal(cand.sparse["hour"], train.sparse["hour"][rows])
    assert np.array_equal(cand.sparse["category"], lookup.fields["category"][cand.item])
    item_cols = [i for i, c in enumerate(data.dense_names) if c.startswith("i_")]
    user_cols = [i for i, c in enumerate(data.dense_names) if c.startswith("u_")]
    assert item_cols and user_cols
    assert (cand.dense[:, item_cols] == 0).all()
    assert np.array_equal(cand.dense[:, user_cols], train.dense[rows][:, user_cols])
    assert all((v == 0).all() for v in cand.labels.values()) and cand.oracle is None
    with pytest.raises(ValueError, match="candidates_per_example"):
        sample_candidates(data, train, -1, seed=0)


def test_teacher_scores_are_published_once_and_line_up(
    data: RankingData, synthetic_wh: Path, tmp_path: Path
) -> None:
    teacher = _teacher(data, tmp_path, seed=0)
    config = TeacherScoreConfig(candidates_per_example=2)
    n_train, n_valid = len(data.splits["train"]), len(data.splits["valid"])
    with Warehouse(synthetic_wh) as wh:
        first = precompute_teacher_scores(wh, data, [teacher], config)
        assert first.computed and first.rows == 3 * n_train + n_valid
        lineage = wh.latest("syn.teacher_scores")
        assert lineage is not None and lineage.inputs == {"syn.examples": data.data_version}
        assert lineage.params["teacher"][0]["weights_sha256"] == teacher.weights_sha256
        again = precompute_teacher_scores(wh, data, [teacher], config)
        assert not again.computed and again.version.version == first.version.version
        n_lineage = int(
            wh.con.execute("SELECT count(*) FROM lineage WHERE table_name = 'syn.teacher_scores'").fetchall()[
                0
            ][0]
        )
        assert n_lineage == 1
        table = wh.sql("SELECT * FROM syn.teacher_scores WHERE split = 'valid' ORDER BY row")
        assert table.height == n_valid and table["labelled"].all()
        direct = score_logits([teacher], data, data.splits["valid"])
        np.testing.assert_allclose(table["teacher_click"].to_numpy(), direct["click"], rtol=1e-5, atol=1e-5)

        ds = load_teacher_scores(wh, data)
        assert len(ds) == 3 * n_train and int(ds.labelled.sum()) == n_train
        assert ds.labelled[:n_train].all() and not ds.labelled[n_train:].any()
        # The rebuilt candidate rows are what the teacher scored: re-scoring them gives the stored logits.
        rescored = score_logits([teacher], data, ds.arrays)
        np.testing.assert_allclose(ds.teacher["click"], rescored["click"], rtol=1e-4, atol=1e-4)
        labelled_only = load_teacher_scores(wh, data, use_unlabelled=False)
        assert len(labelled_only) == n_train

        other = _teacher(data, tmp_path, seed=1)  # new weights: the table is stale and is rebuilt
        assert precompute_teacher_scores(wh, data, [other], config).computed

        smaller = load_ranking_data(wh, "syn", DATA.model_copy(update={"max_train_examples": 200}))
        with pytest.raises(ValueError, match="another subsample"):
            load_teacher_scores(wh, smaller)


def test_the_task_loss_is_the_distillation_loss(
    data: RankingData, synthetic_wh: Path, tmp_path: Path
) -> None:
    teacher = _teacher(data, tmp_path, seed=0)
    with Warehouse(synthetic_wh) as wh:
        precompute_teacher_scores(wh, data, [teacher], TeacherScoreConfig(candidates_per_example=1))
        ds = load_teacher_scores(wh, data)
    train_cfg = RankingTrainConfig(max_len=8, batch_size=64)
    torch.manual_seed(0)
    student = DeepFM(DeepFMConfig(features=data.feature_spec(8)))
    distill = DistillConfig(temperature=2.0, weight=0.7)
    task = DistillationTask(student, data, train_cfg, ds, distill, seed=0)
    batch = next(iter(task.train_batches(1, np.random.default_rng(0))))
    assert (~batch.labelled).any() and batch.labelled.any()  # batches mix labelled rows and candidates
    got = task.loss(student, batch, torch.device("cpu"))
    out = student(batch.batch)
    want = out.aux_loss + sum(
        distillation_loss(
            out.logits[t],
            batch.teacher[t],
            batch.batch.labels[t],
            temperature=2.0,
            weight=0.7,
            labelled=batch.labelled,
        )
        for t in data.tasks
    )
    torch.testing.assert_close(got, want)
    # Without the soft term and the candidates, it is the plain ranking loss.
    plain = DistillationTask(
        student, data, train_cfg, load_teacher_scores_labelled(synthetic_wh, data), DistillConfig(weight=0.0)
    )
    b = next(iter(plain.train_batches(1, np.random.default_rng(0))))
    ref = RankingTask(student, data, train_cfg).loss(student, b.batch, torch.device("cpu"))
    torch.testing.assert_close(plain.loss(student, b, torch.device("cpu")), ref)


def load_teacher_scores_labelled(synthetic_wh: Path, data: RankingData):  # noqa: ANN201
    with Warehouse(synthetic_wh) as wh:
        return load_teacher_scores(wh, data, use_unlabelled=False)


def test_a_distilled_student_moves_toward_the_teacher_and_is_recorded(
    data: RankingData, synthetic_wh: Path, tmp_path: Path
) -> None:
    teacher = _teacher(data, tmp_path, seed=5)
    with torch.no_grad():  # a confident teacher: its logits are far from an untrained student's
        for p in teacher.model.parameters():
            p.mul_(3.0)
    save_weights(teacher.model, weights_path(tmp_path / "teacher-5", "best"))
    teacher = TeacherMember.from_checkpoint("deepfm", teacher.model, MAX_LEN, tmp_path / "teacher-5")
    with Warehouse(synthetic_wh) as wh:
        precompute_teacher_scores(wh, data, [teacher], TeacherScoreConfig(candidates_per_example=2))
        ds = load_teacher_scores(wh, data)
    target = score_logits([teacher], data, data.splits["valid"])["click"]
    torch.manual_seed(0)
    student = DeepFM(DeepFMConfig(features=data.feature_spec(8)))

    def gap() -> float:
        return float(
            np.mean(
                (
                    score_logits([TeacherMember("s", student, 8, "")], data, data.splits["valid"])["click"]
                    - target
                )
                ** 2
            )
        )

    before = gap()
    run_log = RunLog(tmp_path / "runs.duckdb")
    result = train_distilled(
        "deepfm-distilled",
        student,
        data,
        ds,
        seed=0,
        train_config=RankingTrainConfig(max_len=8, batch_size=32),
        loop_config=LoopConfig(
            monitor="auc", max_epochs=3, patience=3, progress=False, optimizer=OptimizerConfig(lr=5e-3)
        ),
        distill_config=DistillConfig(weight=5.0),
        run_log=run_log,
    )
    assert gap() < 0.75 * before
    assert 0.0 <= result.test["auc"] <= 1.0 and result.max_len == 8
    runs = run_log.runs("distill")
    assert runs.height == 1 and runs["status"][0] == "finished" and runs["name"][0] == "deepfm-distilled"
    assert (
        runs["data_version"][0] == data.data_version
        and "distilled from teacher scores" in runs["protocol"][0]
    )
