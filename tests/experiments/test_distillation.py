"""The teacher -> student experiment end to end on tiny synthetic data (report, table, goal line,
warehouse table, run records, reuse on a second call), the goal arithmetic, the quick preset, bad configs
and the CLI on MovieLens-100K."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from recsys.core.config import PathsConfig
from recsys.experiments.common import paired_seed_tests
from recsys.experiments.distillation import (
    RoleResult,
    TeacherStudentConfig,
    TeacherStudentResult,
    app,
    format_table,
    goal_line,
    run_teacher_student,
)
from recsys.training.ranking import RankingDataConfig, RankingTrainConfig
from recsys.warehouse import Warehouse
from recsys.warehouse.runs import RunLog
from tests.fixtures import EXPERIMENT_SYNTHETIC, one_epoch_loop


def tiny_config(**overrides: object) -> TeacherStudentConfig:
    base: dict[str, object] = {
        "dataset": "syn_tiny",
        "synthetic": EXPERIMENT_SYNTHETIC,
        "data": RankingDataConfig(max_train_examples=300, max_valid_examples=120, max_test_examples=150),
        "teacher_len": 24,
        "student_len": 8,
        "baseline_len": 8,
        "seeds": (0,),
        "train": RankingTrainConfig(batch_size=64, flop_examples=64),
        "loop": one_epoch_loop(),
        "latency_candidates": 50,
        "latency_repeats": 1,
    }
    return TeacherStudentConfig(**(base | overrides))


def test_experiment_reports_the_table_and_records_runs(tmp_path: Path) -> None:
    paths = PathsConfig(home=tmp_path / "home")
    config = tiny_config()
    result = run_teacher_student(config, paths, echo=None)
    assert set(result.roles) == {"teacher", "student_distilled", "student_plain", "baseline"}
    teacher, student = result.roles["teacher"], result.roles["student_distilled"]
    assert teacher.max_len == 24 and student.max_len == 8 and result.roles["baseline"].max_len == 8
    assert student.flops_per_example < teacher.flops_per_example
    assert student.num_parameters == result.roles["student_plain"].num_parameters
    assert all(r.latency_ms_per_1k > 0 for r in result.roles.values())
    assert result.scores_computed and result.flops_ratio == pytest.approx(
        student.flops_per_example / teacher.flops_per_example
    )

    report = (paths.artifacts / "distill" / "report_syn_tiny.md").read_text()
    assert format_table(result) in report and goal_line(result) in report
    for row in ("| Teacher | HyFormer | 24 |", "| Student, distilled |", "| Student, no distillation |"):
        assert row in report
    assert "| Baseline | DeepFM | 8 |" in report and "CPU ms / 1k candidates" in report

    with Warehouse(paths.warehouse, read_only=True) as wh:
        assert wh.has_table("syn_tiny.teacher_scores")
    log = RunLog(paths.warehouse)
    distill = log.runs("distill")
    assert set(distill["name"]) == {"rankmixer-distilled", "teacher-student"}
    assert set(distill["status"]) == {"finished"}
    summary = log.metrics(result.summary_run_id)
    names = set(summary["name"])
    assert {"teacher/auc", "student_distilled/auc", "flops_ratio", "goal_met"} <= names
    assert "student_plain/latency_ms_per_1k" in names
    assert set(log.runs("ranking")["name"]) == {"hyformer", "rankmixer", "deepfm"}

    again = run_teacher_student(config, paths, echo=None)  # scores fresh, finished runs reused
    assert not again.scores_computed
    assert again.roles["student_distilled"].test == result.roles["student_distilled"].test
    assert log.runs("distill").filter(log.runs("distill")["name"] == "rankmixer-distilled").height == 1


def _result(
    teacher: float,
    student: float | list[float],
    baseline: float | list[float],
    flops: tuple[float, float],
) -> TeacherStudentResult:
    """A result with one teacher run and per-seed student/baseline AUCs (a float = one seed)."""
    students = student if isinstance(student, list) else [student]
    baselines = baseline if isinstance(baseline, list) else [baseline]

    def role(name: str, aucs: list[float], f: float) -> RoleResult:
        return RoleResult(name, name, 10, [{"auc": a} for a in aucs], 1, f, 1.0, [1.0] * len(aucs))

    roles = {
        "teacher": role("teacher", [teacher], flops[0]),
        "student_distilled": role("student_distilled", students, flops[1]),
        "student_plain": role("student_plain", baselines, flops[1]),
        "baseline": role("baseline", baselines, 1.0),
    }
    tests = []
    if len(students) >= 2:
        tests = paired_seed_tests(
            "student distilled",
            "baseline",
            roles["student_distilled"].test,
            roles["baseline"].test,
            ("auc",),
            lambda t, m: t[m],
        )
    return TeacherStudentResult(
        config=TeacherStudentConfig(),
        data=None,
        roles=roles,
        scores_rows=0,
        scores_computed=True,  # type: ignore[arg-type]
        scores_version="v",
        tests=tests,
    )


def test_goal_arithmetic() -> None:
    met = _result(0.80, [0.795, 0.796, 0.797], [0.720, 0.719, 0.721], (100.0, 10.0))
    assert met.lift_retained == pytest.approx(0.95) and met.goal_met
    assert "MET - lift retained 95.0%" in goal_line(met)
    short = _result(0.80, [0.789, 0.79, 0.791], [0.719, 0.72, 0.721], (100.0, 10.0))
    assert not short.goal_met and "NOT MET - lift retained 87.5%" in goal_line(short)
    costly = _result(0.80, [0.799, 0.80, 0.801], [0.719, 0.72, 0.721], (100.0, 11.0))
    assert costly.lift_retained == pytest.approx(1.0) and not costly.goal_met
    no_lift = _result(0.70, 0.71, 0.72, (100.0, 1.0))
    assert no_lift.lift_retained is None and not no_lift.goal_met
    assert "does not beat the baseline" in goal_line(no_lift)
    noisy = _result(0.74, [0.75, 0.74, 0.73], [0.74, 0.72, 0.73], (100.0, 1.0))
    assert noisy.goal_met is False and "not informative" in goal_line(noisy)
    assert "not informative" not in goal_line(met)


def test_one_seed_is_never_a_success() -> None:
    # The figures reach the goal, but one seed has no spread and no paired test: no claim.
    one = _result(0.80, 0.796, 0.72, (100.0, 10.0))
    assert one.goal_reached_on_means and not one.goal_met
    line = goal_line(one)
    assert "NOT ESTABLISHED (one seed" in line and ": MET" not in line
    # Figures reached over seeds, but the student is not significantly above the baseline.
    shaky = _result(0.80, [0.88, 0.70, 0.81], [0.72, 0.72, 0.72], (100.0, 10.0))
    assert shaky.goal_reached_on_means and not shaky.goal_met
    assert "NOT ESTABLISHED (the figures reach it" in goal_line(shaky)


def test_quick_preset_and_bad_configs() -> None:
    quick = TeacherStudentConfig.quick(dataset="synthetic")
    assert quick.seeds == (0,) and quick.teacher == ("hyformer",) and quick.student_len == 50
    assert quick.data.max_train_examples == 3_000 and quick.synthetic is None
    assert TeacherStudentConfig.quick(seeds=(1, 2)).seeds == (1, 2)
    with pytest.raises(ValueError, match="teacher: unknown ranking model"):
        TeacherStudentConfig(teacher=("hyformer", "gpt"))
    with pytest.raises(ValueError, match="student: unknown ranking model"):
        TeacherStudentConfig(student="tiny")
    with pytest.raises(ValueError, match="teacher_overrides"):
        TeacherStudentConfig(teacher_overrides={"din": {}})
    with pytest.raises(ValueError, match="seeds"):
        TeacherStudentConfig(seeds=(0, 0))
    out = CliRunner().invoke(app, ["teacher-student", "--teacher", "hyformer,nope"])
    assert out.exit_code != 0 and "unknown ranking model" in out.output


def test_cli_on_movielens_prints_the_table_and_the_goal(
    ml100k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "cli-home"))
    args = [
        "teacher-student",
        "--dataset",
        "ml100k",
        "--source-dir",
        str(ml100k_dir),
        "--seeds",
        "1",
        "--teacher-len",
        "16",
        "--student-len",
        "8",
        "--candidates",
        "1",
        "--max-train",
        "300",
        "--max-valid",
        "150",
        "--max-test",
        "200",
        "--max-epochs",
        "1",
    ]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "| Teacher | HyFormer | 16 |" in out.output and "| Student, distilled |" in out.output
    assert "Goal (95% of the teacher's AUC lift" in out.output and "Oracle share" not in out.output
    assert (tmp_path / "cli-home" / "artifacts" / "distill" / "report_ml100k.md").exists()
