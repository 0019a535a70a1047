"""``{% release_actions release as actions %}``: what the release page's action panel
(``templates/console/partials/release_actions.html``) needs, so the partial can be
included by the release page without that view knowing about actions: the latest
review's standing, and an unbound form per action the signed-in user may take."""

from __future__ import annotations

from dataclasses import dataclass

from django import template

from console.reviewing import ReviewStatus, latest_review_status
from console.views.actions import ReasonForm, VerdictForm
from rollout.models import Release, ReleaseState
from rollout.plans import plan_doc
from stagegate.roles import REVIEWER, ROLLOUT_ADMIN, staff_roles

register = template.Library()


@dataclass(frozen=True)
class ReleaseActions:
    latest: ReviewStatus | None
    may_request_review: bool
    may_vote: bool
    requested_by_you: bool
    pause_form: ReasonForm | None
    resume_form: ReasonForm | None
    rollback_form: ReasonForm | None
    rollback_to: str | None
    approve_form: VerdictForm
    reject_form: VerdictForm

    @property
    def any_admin_action(self) -> bool:
        return bool(self.pause_form or self.resume_form or self.rollback_form)


@register.simple_tag(takes_context=True)
def release_actions(context, release: Release) -> ReleaseActions:
    user = context["request"].user
    roles = staff_roles(user)
    admin = ROLLOUT_ADMIN in roles
    retired = release.state == ReleaseState.RETIRED
    latest = latest_review_status(release)
    rollback_to = None
    if admin and not retired:
        try:
            rollback_to = plan_doc(release.active_plan).previous_stage(release.current_stage)
        except KeyError:  # a stage the plan does not have: the page says so elsewhere
            rollback_to = None
    return ReleaseActions(
        latest=latest,
        may_request_review=bool({ROLLOUT_ADMIN, REVIEWER} & roles) and not retired,
        may_vote=latest is not None and latest.may_vote(user),
        requested_by_you=latest is not None and latest.requested_by(user),
        pause_form=ReasonForm(prefix="pause")
        if admin and release.state == ReleaseState.ACTIVE
        else None,
        resume_form=ReasonForm(prefix="resume")
        if admin and release.state == ReleaseState.PAUSED
        else None,
        rollback_form=ReasonForm(prefix="rollback", initial={"from_stage": release.current_stage})
        if rollback_to
        else None,
        rollback_to=rollback_to,
        approve_form=VerdictForm(prefix="approve"),
        reject_form=VerdictForm(prefix="reject"),
    )
