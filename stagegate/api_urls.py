"""Every admin API endpoint, on one router (``/api/``)."""

from __future__ import annotations

from rest_framework.permissions import IsAuthenticated
from rest_framework.routers import APIRootView, DefaultRouter

from access.api import ApiKeyViewSet, MembershipViewSet, OrganizationViewSet, VerificationViewSet
from monitoring.api import AuditEventViewSet
from rollout.api import (
    ApprovalViewSet,
    IncidentViewSet,
    PlanViewSet,
    ReleasePlanViewSet,
    ReleaseViewSet,
    ReviewViewSet,
    TransitionViewSet,
)
from tuning.api import FineTuningJobViewSet


class StagegateRootView(APIRootView):
    """The list of endpoints; what each one shows still depends on the caller's role."""

    permission_classes = [IsAuthenticated]


class Router(DefaultRouter):
    APIRootView = StagegateRootView


router = Router()
router.register("orgs", OrganizationViewSet, basename="organization")
router.register(r"orgs/(?P<org_public_id>[^/.]+)/members", MembershipViewSet, basename="member")
router.register("verifications", VerificationViewSet, basename="verification")
router.register("keys", ApiKeyViewSet, basename="apikey")
router.register("releases", ReleaseViewSet, basename="release")
router.register(
    r"releases/(?P<release_public_id>[^/.]+)/plans", ReleasePlanViewSet, basename="release-plan"
)
router.register("plans", PlanViewSet, basename="plan")
router.register("transitions", TransitionViewSet, basename="transition")
router.register("reviews", ReviewViewSet, basename="review")
router.register("approvals", ApprovalViewSet, basename="approval")
router.register("incidents", IncidentViewSet, basename="incident")
router.register("audit", AuditEventViewSet, basename="audit")
router.register("fine-tuning/jobs", FineTuningJobViewSet, basename="fine-tuning-job")

urlpatterns = router.urls
