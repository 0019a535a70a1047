"""The fine-tuning API: what the console's fine-tuning pages show and do, scriptable.

- ``GET /api/fine-tuning/jobs/`` and ``.../{public_id}/``: jobs with their screening,
  flagged rows (redacted excerpts), tuned model, latest assessment and decisions. Staff
  of every role read every job; an org admin reads only their organizations' jobs, and
  any other job answers 404 exactly as if it did not exist (``access.api``'s rule).
- ``POST .../{public_id}/decide-dataset/`` and ``.../decide-model/``: a reviewer's
  approve or reject (a comment is required to reject) of a held dataset or a held tuned
  model, written by ``tuning.services.decide_dataset``/``decide_model`` with its audit
  row; their refusals (``not_held``, ``already_decided``, ...) are answered by the API's
  exception handler. Only the reviewer role decides (403 for anyone else).
"""

from __future__ import annotations

from django.db.models import Prefetch, Q
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from stagegate.api import ErrorSerializer, cursor_pagination, query_filters
from stagegate.permissions import IsReviewer, StaffOrOrgAdmin, narrow_to_orgs
from stagegate.roles import admin_org_ids, can_read_all
from tuning import services
from tuning.models import (
    Assessment,
    DatasetFinding,
    DecisionSubject,
    DecisionVerdict,
    FineTuningJob,
    TunedModel,
    TuningDecision,
)
from tuning.serializers import (
    FINDINGS_LIMIT,
    FineTuningJobDetailSerializer,
    FineTuningJobFilterSerializer,
    FineTuningJobSerializer,
    TuningDecisionResultSerializer,
    TuningVerdictSerializer,
)

# Columns no answer shows: the uploaded file's bytes and the lines kept for training.
HEAVY = ("training_file__content", "kept_lines")

DECISION_RESPONSES = {
    201: TuningDecisionResultSerializer,
    400: OpenApiResponse(
        ErrorSerializer, description="`invalid`: no verdict, or a reject without a comment."
    ),
    403: OpenApiResponse(ErrorSerializer, description="Not a reviewer (`permission_denied`)."),
    409: OpenApiResponse(
        ErrorSerializer,
        description="`not_held`: nothing of this job awaits review; `already_decided`: "
        "you decided on it already (four eyes are two reviewers).",
    ),
}


@extend_schema_view(
    list=extend_schema(
        summary="Fine-tuning jobs, newest first (org admins: their organizations')",
        parameters=[FineTuningJobFilterSerializer],
    ),
    retrieve=extend_schema(
        summary="One fine-tuning job with its screening, findings, model, assessment and decisions"
    ),
)
class FineTuningJobViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    lookup_field = "public_id"
    pagination_class = cursor_pagination("-created_at")

    def get_permissions(self):
        if self.action in ("decide_dataset", "decide_model"):
            return [IsReviewer()]
        return [StaffOrOrgAdmin()]

    def get_serializer_class(self):
        if self.action == "retrieve":
            return FineTuningJobDetailSerializer
        return FineTuningJobSerializer

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return FineTuningJob.objects.none()
        queryset = FineTuningJob.objects.select_related(
            "release", "organization", "training_file", "tuned_model"
        ).defer(*HEAVY)
        if self.action == "list":
            filters = query_filters(self.request, FineTuningJobFilterSerializer)
            if "release" in filters:
                name = filters["release"]
                queryset = queryset.filter(Q(release__public_id=name) | Q(release__name=name))
            if "status" in filters:
                queryset = queryset.filter(status=filters["status"])
            if "dataset_review" in filters:
                queryset = queryset.filter(dataset_review=filters["dataset_review"])
        elif self.action == "retrieve":
            queryset = queryset.prefetch_related(
                Prefetch("decisions", TuningDecision.objects.select_related("reviewer"))
            )
        # The reading scope even for a decision's POST: reviewers decide on every
        # organization's jobs, as they read them (``scope_to_orgs`` would narrow a POST to
        # the organizations the caller administers). Only staff pass IsReviewer.
        user = self.request.user
        return narrow_to_orgs(queryset, None if can_read_all(user) else admin_org_ids(user))

    def retrieve(self, request, *args, **kwargs):
        job = self.get_object()
        findings = DatasetFinding.objects.filter(job=job).order_by("line", "id")
        tuned = _tuned_model(job)
        context = {
            **self.get_serializer_context(),
            "findings": list(findings[:FINDINGS_LIMIT]),
            "findings_total": findings.count(),
            "latest_assessment": (
                Assessment.objects.filter(tuned_model=tuned).order_by("-created_at", "-id").first()
                if tuned is not None
                else None
            ),
        }
        return Response(FineTuningJobDetailSerializer(job, context=context).data)

    def _decide(self, request, subject: str) -> Response:
        serializer = TuningVerdictSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        job = self.get_object()
        decide = (
            services.decide_dataset if subject == DecisionSubject.DATASET else services.decide_model
        )
        outcome = decide(job=job, reviewer=request.user, **serializer.validated_data)
        decision = TuningDecision.objects.select_related("reviewer").get(
            job=job, subject=subject, reviewer=request.user
        )
        job = self.get_queryset().get(pk=job.pk)  # as the decision left it
        tuned = _tuned_model(job)
        needed = job.approvals_needed
        if subject == DecisionSubject.MODEL and tuned is not None:
            needed = tuned.approvals_needed
        approvals = TuningDecision.objects.filter(
            job=job, subject=subject, verdict=DecisionVerdict.APPROVE
        ).count()
        body = {
            "outcome": outcome,
            "approvals": approvals,
            "approvals_needed": needed,
            "decision": decision,
            "job": job,
        }
        return Response(TuningDecisionResultSerializer(body).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Approve or reject a held dataset (reviewer; a reject needs a comment)",
        description="The job is queued for training once `approvals_needed` different "
        "reviewers approved, and fails (`dataset_rejected`) at the first reject.",
        request=TuningVerdictSerializer,
        responses=DECISION_RESPONSES,
    )
    @action(detail=True, methods=["post"], url_path="decide-dataset")
    def decide_dataset(self, request, public_id=None):
        return self._decide(request, DecisionSubject.DATASET)

    @extend_schema(
        summary="Approve or reject a tuned model its assessment held (reviewer; a reject "
        "needs a comment)",
        description="The model becomes callable (`active`) once `approvals_needed` "
        "different reviewers approved, and is never served after a reject.",
        request=TuningVerdictSerializer,
        responses=DECISION_RESPONSES,
    )
    @action(detail=True, methods=["post"], url_path="decide-model")
    def decide_model(self, request, public_id=None):
        return self._decide(request, DecisionSubject.MODEL)


def _tuned_model(job: FineTuningJob) -> TunedModel | None:
    """The job's tuned model (joined by the queryset), or None."""
    try:
        return job.tuned_model
    except TunedModel.DoesNotExist:
        return None
