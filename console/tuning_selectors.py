"""What the console's fine-tuning pages read, in a number of queries that does not grow
with the rows shown.

- ``held_datasets``/``held_models``: the review queue, oldest first: jobs whose
  screening held their training file (``dataset_review`` pending while the job is still
  ``validating_files``) and tuned models their assessment held, each with the approvals
  counted so far (``TuningDecision`` rows, one per reviewer, so the count is of people).
- ``recent_jobs``: jobs newest first, filtered by release and status, with their tuned
  model (a reverse one-to-one, joined).
- ``telemetry``: per (release, stage, tier, organization), the files and jobs, the jobs
  by screening verdict and the assessments passed and failed: two grouped queries.
- ``fine_tuning_usage``: the same figures over a period and the usage page's filters,
  with reviewers' outcomes of held datasets: two grouped queries.
- ``job_detail``: one job with everything its page shows.
- ``release_fine_tuning``: what a release's page shows of fine-tuning.

A job's ``training_file.content`` (up to the plan's ``max_bytes``) and ``kept_lines`` are
never loaded here: no page shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from tuning.models import (
    Assessment,
    DatasetFinding,
    DatasetVerdict,
    DecisionSubject,
    DecisionVerdict,
    FineTuningJob,
    JobEvent,
    JobStatus,
    ReviewStatus,
    TunedModel,
    TunedModelStatus,
    TuningDecision,
)

QUEUE_LIMIT = 100  # held items listed at once; the queue says how many more wait
EVENTS_LIMIT = 200
TUNED_MODELS_LIMIT = 20  # on a release's page

# Columns a job's row never needs: the uploaded file's bytes and the lines kept.
HEAVY = ("training_file__content", "kept_lines")
VERDICTS = tuple(DatasetVerdict.values)
ALL_TIME = datetime(2000, 1, 1, tzinfo=UTC)  # before any job


def _approvals(subject: str) -> Count:
    return Count(
        "decisions",
        filter=Q(decisions__subject=subject, decisions__verdict=DecisionVerdict.APPROVE),
        distinct=True,
    )


def held_datasets_query() -> QuerySet[FineTuningJob]:
    """Jobs waiting for reviewers to release or reject their screened training file."""
    return FineTuningJob.objects.filter(
        dataset_review=ReviewStatus.PENDING, status=JobStatus.VALIDATING_FILES
    )


def held_datasets(limit: int = QUEUE_LIMIT) -> list[FineTuningJob]:
    """The first ``limit`` held datasets, oldest first, each with ``approvals`` (approve
    decisions so far) and its release and organization joined."""
    return list(
        held_datasets_query()
        .select_related("release", "organization")
        .defer("kept_lines")
        .annotate(approvals=_approvals(DecisionSubject.DATASET))
        .order_by("created_at", "id")[:limit]
    )


def held_models(limit: int = QUEUE_LIMIT) -> list[TunedModel]:
    """The first ``limit`` tuned models held after their assessment, oldest first, each
    with ``approvals`` and its job, parent release and organization joined."""
    return list(
        TunedModel.objects.filter(status=TunedModelStatus.HELD)
        .select_related("job", "parent", "organization")
        .defer("job__kept_lines")
        .annotate(
            approvals=Count(
                "job__decisions",
                filter=Q(
                    job__decisions__subject=DecisionSubject.MODEL,
                    job__decisions__verdict=DecisionVerdict.APPROVE,
                ),
                distinct=True,
            )
        )
        .order_by("created_at", "id")[:limit]
    )


@dataclass(frozen=True)
class Queue:
    datasets: list[FineTuningJob]
    models: list[TunedModel]
    datasets_total: int
    models_total: int


def review_queue(limit: int = QUEUE_LIMIT) -> Queue:
    """Held datasets and held models, oldest first, at most ``limit`` of each, with how
    many are held in all (counted only when the limit cut the list)."""
    datasets = held_datasets(limit)
    models = held_models(limit)
    datasets_total = len(datasets)
    if datasets_total >= limit:
        datasets_total = held_datasets_query().count()
    models_total = len(models)
    if models_total >= limit:
        models_total = TunedModel.objects.filter(status=TunedModelStatus.HELD).count()
    return Queue(datasets, models, datasets_total, models_total)


def recent_jobs(*, release: str = "", status: str = "") -> QuerySet[FineTuningJob]:
    """Jobs newest first, of ``release`` and in ``status`` when given, with their
    release, organization and tuned model (or None) joined."""
    jobs = FineTuningJob.objects.select_related("release", "organization", "tuned_model").defer(
        "kept_lines"
    )
    if release:
        jobs = jobs.filter(release__name=release)
    if status:
        jobs = jobs.filter(status=status)
    return jobs.order_by("-created_at", "-id")


# --- telemetry ----------------------------------------------------------------------------


# --- usage over a period -----------------------------------------------------------------


@dataclass
class FineTuningUsageRow:
    """Fine-tuning of one (release, stage, tier, organization slug) over a period, as
    ``fine_tuning_usage`` counts it."""

    release: str
    stage: str
    tier: str
    org: str
    files: int = 0
    jobs: int = 0
    screened: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    datasets_approved: int = 0
    datasets_rejected: int = 0
    assessments_passed: int = 0
    assessments_failed: int = 0

    @property
    def screened_counts(self) -> list[tuple[str, int]]:
        """(verdict, datasets) in ``VERDICTS`` order."""
        return [(verdict, self.screened[verdict]) for verdict in VERDICTS]

    @property
    def counts(self) -> list[int]:
        """Every count in column order: files, jobs, screened per verdict, approved,
        rejected, assessments passed, failed (the page's table and the CSV)."""
        return [
            self.files,
            self.jobs,
            *(self.screened[verdict] for verdict in VERDICTS),
            self.datasets_approved,
            self.datasets_rejected,
            self.assessments_passed,
            self.assessments_failed,
        ]


USAGE_COLUMNS = (
    "training_files",
    "jobs_created",
    *(f"screened_{verdict}" for verdict in VERDICTS),
    "held_approved",
    "held_rejected",
    "assessments_passed",
    "assessments_failed",
)


def fine_tuning_usage(
    *,
    since: datetime,
    until: datetime,
    release: str = "",
    stage: str = "",
    tier: str = "",
    org: str = "",
) -> list[FineTuningUsageRow]:
    """Fine-tuning over [since, until) per (release, stage, tier, organization slug),
    narrowed to ``release`` (a name), ``stage``, ``tier`` and ``org`` (a slug) when given,
    sorted by those four; a group with nothing in the period is absent. Two queries.

    ``files`` and ``jobs`` count the jobs created in the period and the distinct training
    files they use; ``screened`` the jobs whose training file was screened in the period
    (by ``screened_at``), per verdict; ``datasets_approved``/``datasets_rejected`` those
    of them (screened in the period) that reviewers released or rejected since, so a held
    dataset counts once, under its screening, whenever it was decided; assessments count
    by when they ran, under the stage, tier and organization they record.
    """
    created = Q(created_at__gte=since, created_at__lt=until)
    screened = Q(screened_at__gte=since, screened_at__lt=until)
    narrowed = Q()
    if release:
        narrowed &= Q(release__name=release)
    if stage:
        narrowed &= Q(stage=stage)
    if tier:
        narrowed &= Q(tier=tier)
    if org:
        narrowed &= Q(organization__slug=org)
    key_fields = ("release__name", "stage", "tier", "organization__slug")
    rows: dict[tuple[str, str, str, str], FineTuningUsageRow] = {}

    def row(values: dict[str, Any]) -> FineTuningUsageRow:
        key = tuple(values[name] for name in key_fields)
        if key not in rows:
            rows[key] = FineTuningUsageRow(*key)
        return rows[key]

    jobs = (
        FineTuningJob.objects.filter(narrowed)
        .filter(created | screened)
        .values(*key_fields)
        .order_by()
        .annotate(
            n_files=Count("training_file", filter=created, distinct=True),
            n_jobs=Count("id", filter=created),
            n_approved=Count("id", filter=screened & Q(dataset_review=ReviewStatus.APPROVED)),
            n_rejected=Count("id", filter=screened & Q(dataset_review=ReviewStatus.REJECTED)),
            **{
                f"v_{verdict}": Count("id", filter=screened & Q(verdict=verdict))
                for verdict in VERDICTS
            },
        )
    )
    for values in jobs:
        found = row(values)
        found.files, found.jobs = values["n_files"], values["n_jobs"]
        found.datasets_approved = values["n_approved"]
        found.datasets_rejected = values["n_rejected"]
        found.screened = {verdict: values[f"v_{verdict}"] for verdict in VERDICTS}
    assessments = (
        Assessment.objects.filter(narrowed)
        .filter(created)
        .values(*key_fields)
        .order_by()
        .annotate(
            n_passed=Count("id", filter=Q(passed=True)),
            n_failed=Count("id", filter=Q(passed=False)),
        )
    )
    for values in assessments:
        found = row(values)
        found.assessments_passed, found.assessments_failed = values["n_passed"], values["n_failed"]
    return [rows[key] for key in sorted(rows)]


def telemetry(*, release: str = "") -> list[FineTuningUsageRow]:
    """All the fine-tuning so far per (release, stage, tier, organization) of ``release``
    when given: ``fine_tuning_usage`` over all time (the queue page's table)."""
    return fine_tuning_usage(
        since=ALL_TIME, until=timezone.now() + timedelta(seconds=1), release=release
    )


def fine_tuning_usage_total(rows: list[FineTuningUsageRow]) -> list[int]:
    """The column sums of ``rows``, in ``FineTuningUsageRow.counts`` order."""
    total = [0] * len(USAGE_COLUMNS)
    for found in rows:
        total = [a + b for a, b in zip(total, found.counts, strict=True)]
    return total


# --- one job ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AssessmentSet:
    """One prompt set of an assessment's stored results, ready for a table."""

    name: str
    label: str
    counted: str  # what the counts count: refusals or answers
    figures: dict[str, Any]
    prompts: list[dict[str, Any]]


@dataclass(frozen=True)
class AssessmentView:
    assessment: Assessment
    sets: list[AssessmentSet]


SETS = (
    ("refusal", "must_refuse", "Must refuse", "refusals"),
    ("answer", "must_answer", "Must answer", "answers"),
)


def assessment_view(assessment: Assessment) -> AssessmentView:
    """``assessment``'s stored results (``AssessmentResult.to_json``) as one table per
    prompt set; an assessment with no results (a plan without an assessment) has none."""
    results = assessment.results or {}
    prompts = results.get("prompts") or []
    sets = []
    for key, set_name, label, counted in SETS:
        figures = results.get(key)
        if not isinstance(figures, dict):
            continue
        sets.append(
            AssessmentSet(
                name=set_name,
                label=label,
                counted=counted,
                figures=figures,
                prompts=[p for p in prompts if p.get("set_name") == set_name],
            )
        )
    return AssessmentView(assessment, sets)


@dataclass(frozen=True)
class Decisions:
    """The reviewers' decisions on one subject of a job (the held dataset or model)."""

    subject: str
    decisions: list[TuningDecision]
    needed: int
    held: bool  # still awaiting reviewers

    @property
    def approvals(self) -> int:
        return sum(1 for d in self.decisions if d.verdict == DecisionVerdict.APPROVE)

    @property
    def reviewer_ids(self) -> frozenset[int]:
        """Who decided already (each reviewer decides once)."""
        return frozenset(d.reviewer_id for d in self.decisions)


@dataclass(frozen=True)
class JobDetail:
    job: FineTuningJob
    categories: list[tuple[str, int]]
    events: list[JobEvent]
    tuned_model: TunedModel | None
    assessments: list[AssessmentView]
    dataset: Decisions | None  # None: the dataset was never held
    model: Decisions | None  # None: the model was never held


def job_query() -> QuerySet[FineTuningJob]:
    return FineTuningJob.objects.select_related("release", "organization", "training_file").defer(
        *HEAVY
    )


def findings(job: FineTuningJob) -> QuerySet[DatasetFinding]:
    """The job's flagged and blocked rows still kept, by line."""
    return DatasetFinding.objects.filter(job=job).order_by("line", "id")


def _decisions(job: FineTuningJob) -> dict[str, list[TuningDecision]]:
    by_subject: dict[str, list[TuningDecision]] = {s: [] for s in DecisionSubject.values}
    for decision in TuningDecision.objects.filter(job=job).select_related("reviewer"):
        by_subject[decision.subject].append(decision)
    return by_subject


def decisions_for(job: FineTuningJob, subject: str, tuned: TunedModel | None = None) -> Decisions:
    """The decisions on ``subject`` of ``job`` as they stand now (read fresh)."""
    listed = _decisions(job)[subject]
    return _subject_decisions(job, subject, listed, tuned)


def _subject_decisions(
    job: FineTuningJob, subject: str, listed: list[TuningDecision], tuned: TunedModel | None
) -> Decisions:
    if subject == DecisionSubject.DATASET:
        held = (
            job.dataset_review == ReviewStatus.PENDING and job.status == JobStatus.VALIDATING_FILES
        )
        return Decisions(subject, listed, job.approvals_needed, held)
    assert tuned is not None
    return Decisions(subject, listed, tuned.approvals_needed, tuned.status == TunedModelStatus.HELD)


def job_detail(job: FineTuningJob) -> JobDetail:
    """Everything the job's page shows but its findings (paginated on their own)."""
    tuned = TunedModel.objects.select_related("organization").filter(job=job).first()
    by_subject = _decisions(job)
    dataset = None
    if job.dataset_review or by_subject[DecisionSubject.DATASET]:
        dataset = _subject_decisions(
            job, DecisionSubject.DATASET, by_subject[DecisionSubject.DATASET], None
        )
    model = None
    if tuned is not None and (
        tuned.status == TunedModelStatus.HELD or by_subject[DecisionSubject.MODEL]
    ):
        model = _subject_decisions(
            job, DecisionSubject.MODEL, by_subject[DecisionSubject.MODEL], tuned
        )
    assessments = (
        [assessment_view(a) for a in Assessment.objects.filter(tuned_model=tuned)]
        if tuned is not None
        else []
    )
    categories = sorted(
        ((str(name), int(count)) for name, count in (job.categories or {}).items()),
        key=lambda item: (-item[1], item[0]),
    )
    return JobDetail(
        job=job,
        categories=categories,
        events=list(JobEvent.objects.filter(job=job).order_by("-created_at", "-id")[:EVENTS_LIMIT]),
        tuned_model=tuned,
        assessments=assessments,
        dataset=dataset,
        model=model,
    )


# --- a release's page ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseFineTuning:
    tuned_models: list[TunedModel]
    tuned_models_total: int
    stage: str
    verdicts: list[tuple[str, int]]  # (verdict or "unscreened", jobs) in the current stage
    jobs: int  # jobs of the current stage

    @property
    def empty(self) -> bool:
        return not self.tuned_models and not self.jobs


def release_fine_tuning(release) -> ReleaseFineTuning:
    """``release``'s tuned models (newest first, at most ``TUNED_MODELS_LIMIT``) and its
    jobs of the current stage by screening verdict."""
    tuned = list(
        TunedModel.objects.filter(parent=release)
        .select_related("organization", "job")
        .defer("job__kept_lines")
        .order_by("-created_at", "-id")[:TUNED_MODELS_LIMIT]
    )
    total = len(tuned)
    if total >= TUNED_MODELS_LIMIT:
        total = TunedModel.objects.filter(parent=release).count()
    counted = dict(
        FineTuningJob.objects.filter(release=release, stage=release.current_stage)
        .values("verdict")
        .annotate(n=Count("id"))
        .values_list("verdict", "n")
    )
    verdicts = [(verdict, counted.get(verdict, 0)) for verdict in VERDICTS]
    verdicts.append(("unscreened", counted.get("", 0)))
    return ReleaseFineTuning(
        tuned_models=tuned,
        tuned_models_total=total,
        stage=release.current_stage,
        verdicts=verdicts,
        jobs=sum(counted.values()),
    )
