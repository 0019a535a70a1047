"""Applying, reading and exporting rollout plans.

``apply_plan`` is the one way a plan version is written: it validates the whole
document, computes the diff against the active version, and stores a new
immutable version with its audit row in one transaction, or nothing at all.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone

from monitoring import audit
from monitoring.redaction import redact_secrets
from rollout.models import Release, ReleaseState, RolloutPlan, StageTransition, TransitionKind
from rollout.plan_schema import (
    PlanError,
    PlanInvalid,
    RolloutPlanDoc,
    StagePolicy,
    canonical_dict,
    canonical_yaml,
    parse_plan,
    plan_digest,
)


@dataclass
class ApplyResult:
    release_name: str
    changed: bool  # False: the document equals the active version; nothing to store
    applied: bool  # False on a dry run or when nothing changed
    version: int | None  # the new version, or the active one when unchanged
    previous_version: int | None
    diff: str
    created_release: bool = False
    notes: list[str] = field(default_factory=list)


def plan_doc(plan: RolloutPlan) -> RolloutPlanDoc:
    return RolloutPlanDoc.model_validate(plan.document)


def _diff(previous: RolloutPlan | None, doc: RolloutPlanDoc) -> str:
    before = canonical_yaml(plan_doc(previous)) if previous else ""
    after = canonical_yaml(doc)
    label = f"{doc.release} v{previous.version}" if previous else "(none)"
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=label,
            tofile=f"{doc.release} (new)",
        )
    )


def apply_plan(
    source: str | bytes,
    *,
    actor,
    dry_run: bool = False,
    comment: str = "",
) -> ApplyResult:
    """Validate ``source`` and store it as the release's next plan version.

    Raises PlanInvalid (every error, by field path) and stores nothing when the
    document is invalid or cannot apply to the release as it stands (its current
    stage missing from the new plan). Applying a document equal to the active
    version stores nothing and reports ``changed=False``.
    """
    text = source.decode("utf-8", errors="replace") if isinstance(source, bytes) else source
    doc = parse_plan(source)
    redacted = redact_secrets(text)
    if redacted != text:  # an API key pasted into a plan: no version keeps its secret
        text, doc = redacted, parse_plan(redacted)
    digest = plan_digest(doc)
    with transaction.atomic():
        release = Release.objects.select_for_update().filter(name=doc.release).first()
        previous = release.active_plan if release else None
        diff = _diff(previous, doc)
        if previous is not None and previous.digest == digest:
            return ApplyResult(doc.release, False, False, previous.version, previous.version, "")
        if release is not None and doc.stage(release.current_stage) is None:
            raise PlanInvalid(
                [
                    PlanError(
                        "stages",
                        f"{doc.release} is now in stage {release.current_stage!r}, which this plan "
                        "does not have; keep that stage or move the release out of it first",
                        "current_stage_removed",
                    )
                ]
            )
        version = (previous.version + 1) if previous else 1
        result = ApplyResult(
            doc.release,
            True,
            not dry_run,
            version,
            previous.version if previous else None,
            diff,
            created_release=release is None,
        )
        if dry_run:
            return result
        now = timezone.now()
        if release is None:
            release = Release.objects.create(
                name=doc.release,
                description=doc.description,
                upstream_base_url=str(doc.upstream.base_url),
                upstream_model=doc.upstream.model,
                current_stage=doc.stage_names[0],
                stage_entered_at=now,
            )
        plan = RolloutPlan.objects.create(
            release=release,
            version=version,
            document=canonical_dict(doc),
            source=text,
            digest=digest,
            comment=comment[:300],
            created_by=actor if getattr(actor, "pk", None) else None,
        )
        upstream_before = (release.upstream_base_url, release.upstream_model)
        release.active_plan = plan
        release.description = doc.description
        release.upstream_base_url = str(doc.upstream.base_url)
        release.upstream_model = doc.upstream.model
        release.save()
        audit.record(
            "plan.applied",
            actor=actor,
            object_type=audit.ObjectType.RELEASE,
            object_id=release.public_id,
            data={
                "release": release.name,
                "plan": plan.public_id,
                "version": version,
                "previous_version": result.previous_version,
                "digest": digest,
                "comment": plan.comment,
                "upstream_changed": previous is not None
                and upstream_before != (release.upstream_base_url, release.upstream_model),
            },
        )
        if result.created_release:
            StageTransition.objects.create(
                release=release,
                kind=TransitionKind.CREATE,
                to_stage=release.current_stage,
                to_state=ReleaseState.ACTIVE,
                plan=plan,
                actor=plan.created_by,
                reason="release created with its first plan",
            )
            audit.record(
                "release.created",
                actor=actor,
                object_type=audit.ObjectType.RELEASE,
                object_id=release.public_id,
                data={"release": release.name, "stage": release.current_stage},
            )
    return result


def export_plan(release: Release, version: int | None = None) -> str:
    """The canonical YAML of the active (or given) version; ``apply_plan`` accepts it."""
    plan = release.active_plan if version is None else release.plans.get(version=version)
    if plan is None:
        raise RolloutPlan.DoesNotExist(f"{release.name} has no plan")
    return canonical_yaml(plan_doc(plan))


def current_stage_policies() -> dict[str, StagePolicy]:
    """Release name -> policy of its current stage, for every non-retired release."""
    policies: dict[str, StagePolicy] = {}
    releases = Release.objects.exclude(state=ReleaseState.RETIRED).select_related("active_plan")
    for release in releases:
        if release.active_plan is None:
            continue
        stage = plan_doc(release.active_plan).stage(release.current_stage)
        if stage is not None:
            policies[release.name] = stage
    return policies
