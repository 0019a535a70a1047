"""The rollout API: releases, their plan history, validating and applying plans, and
stage transitions. Reading is for staff; applying a plan is for rollout admins and
goes through ``rollout.plans.apply_plan``, which validates and audits."""

from __future__ import annotations

import json

from django.db.models import Q
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser, JSONParser
from rest_framework.response import Response

from rollout import incidents, transitions
from rollout.models import (
    Approval,
    Incident,
    Release,
    Review,
    ReviewTrigger,
    RolloutPlan,
    StageTransition,
    Verdict,
)
from rollout.plan_schema import MAX_PLAN_BYTES
from rollout.plans import ApplyResult, apply_plan
from rollout.reviews import create_review
from rollout.serializers import (
    ApprovalSerializer,
    ApproveResultSerializer,
    IncidentFilterSerializer,
    IncidentSerializer,
    PlanApplyResultSerializer,
    PlanDocumentSerializer,
    PlanSourceSerializer,
    PlanValidateResultSerializer,
    PlanVersionSerializer,
    ReasonSerializer,
    ReleaseSerializer,
    ResolveSerializer,
    ReviewDetailSerializer,
    ReviewRequestSerializer,
    ReviewSerializer,
    RollbackSerializer,
    TransitionSerializer,
    VerdictSerializer,
)
from stagegate.api import ErrorSerializer, cursor_pagination, query_filters
from stagegate.permissions import (
    IsReviewer,
    IsRolloutAdmin,
    IsStaff,
    StaffReadAdminWrite,
    StaffReadReviewerOrAdminWrite,
)


class YAMLParser(BaseParser):
    """A raw YAML body, handed on as ``{"document": <text>}`` unparsed: the plan
    schema parses it and reports YAML errors with the plan's other errors."""

    media_type = "application/yaml"

    def parse(self, stream, media_type=None, parser_context=None):
        raw = stream.read(MAX_PLAN_BYTES + 1) if stream is not None else b""
        if len(raw) > MAX_PLAN_BYTES:
            raise ParseError(f"the document is over {MAX_PLAN_BYTES} bytes")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ParseError(f"the body is not valid UTF-8 (at byte {exc.start})") from None
        return {"document": text}


class TextYAMLParser(YAMLParser):
    media_type = "text/yaml"


# --- releases and their plans ----------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="List releases"),
    retrieve=extend_schema(summary="One release"),
)
class ReleaseViewSet(viewsets.ReadOnlyModelViewSet):
    """Releases; rollout admins pause, resume and roll them back, with a reason.

    Each of those answers 201 with the transition it made, or 200 with
    ``{"changed": false}`` when there was nothing to do (already paused, ...)."""

    lookup_field = "public_id"
    permission_classes = [StaffReadAdminWrite]
    serializer_class = ReleaseSerializer
    pagination_class = cursor_pagination("name")
    queryset = Release.objects.select_related("active_plan")

    def _changed(self, transition) -> Response:
        if transition is None:
            return Response({"changed": False}, status=status.HTTP_200_OK)
        return Response(TransitionSerializer(transition).data, status=status.HTTP_201_CREATED)

    def _reason(self, serializer_class=ReasonSerializer) -> dict:
        serializer = serializer_class(data=self.request.data)
        serializer.is_valid(raise_exception=True)
        return serializer.validated_data

    @extend_schema(
        summary="Pause a release: the proxy refuses it until resumed (rollout admin)",
        request=ReasonSerializer,
        responses={201: TransitionSerializer, 200: OpenApiTypes.OBJECT, 409: ErrorSerializer},
    )
    @action(detail=True, methods=["post"])
    def pause(self, request, public_id=None):
        data = self._reason()
        release = self.get_object()
        return self._changed(transitions.pause(release, actor=request.user, reason=data["reason"]))

    @extend_schema(
        summary="Resume a paused release in its stage (rollout admin)",
        request=ReasonSerializer,
        responses={201: TransitionSerializer, 200: OpenApiTypes.OBJECT, 409: ErrorSerializer},
    )
    @action(detail=True, methods=["post"])
    def resume(self, request, public_id=None):
        data = self._reason()
        release = self.get_object()
        return self._changed(transitions.resume(release, actor=request.user, reason=data["reason"]))

    @extend_schema(
        summary="Roll a release back one stage (rollout admin)",
        request=RollbackSerializer,
        responses={201: TransitionSerializer, 200: OpenApiTypes.OBJECT, 409: ErrorSerializer},
    )
    @action(detail=True, methods=["post"])
    def rollback(self, request, public_id=None):
        data = self._reason(RollbackSerializer)
        release = self.get_object()
        return self._changed(
            transitions.rollback(
                release,
                actor=request.user,
                reason=data["reason"],
                from_stage=data.get("from_stage"),
            )
        )


RELEASE_PATH = OpenApiParameter(
    "release_public_id", OpenApiTypes.STR, OpenApiParameter.PATH, description="The release."
)
VERSION_PATH = OpenApiParameter(
    "version", OpenApiTypes.INT, OpenApiParameter.PATH, description="The plan version."
)


@extend_schema_view(
    list=extend_schema(summary="A release's plan history", parameters=[RELEASE_PATH]),
    retrieve=extend_schema(
        summary="One plan version with its canonical document",
        parameters=[RELEASE_PATH, VERSION_PATH],
    ),
)
class ReleasePlanViewSet(viewsets.ReadOnlyModelViewSet):
    """Plan versions of one release, at ``/api/releases/{release_public_id}/plans/``."""

    lookup_field = "version"
    lookup_value_regex = r"[0-9]+"
    permission_classes = [StaffReadAdminWrite]
    pagination_class = cursor_pagination("-version")

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return RolloutPlan.objects.none()
        release = get_object_or_404(Release, public_id=self.kwargs["release_public_id"])
        return RolloutPlan.objects.filter(release=release).select_related("created_by")

    def get_serializer_class(self):
        return PlanDocumentSerializer if self.action == "retrieve" else PlanVersionSerializer


# --- validating and applying plans ---------------------------------------------------------

PLAN_REQUEST = {
    "application/json": PlanSourceSerializer,
    "application/yaml": OpenApiTypes.STR,
    "text/yaml": OpenApiTypes.STR,
}
PLAN_INVALID = OpenApiResponse(
    ErrorSerializer,
    description="`plan_invalid` with every problem in `details` (path, message, code), "
    "or `invalid` when the request itself is malformed.",
)
COMMENT_PARAM = OpenApiParameter(
    "comment", OpenApiTypes.STR, description="Why this version, when the body is raw YAML."
)


def _plan_source(request) -> tuple[str, str]:
    """(plan text, comment) from a JSON body or a raw YAML body."""
    serializer = PlanSourceSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    document = serializer.validated_data["document"]
    # JSON is YAML, so an object is kept as readable JSON text: the source as applied.
    text = document if isinstance(document, str) else json.dumps(document, indent=2)
    comment = serializer.validated_data["comment"] or request.query_params.get("comment", "")
    return text, comment[:300]


def _result(result: ApplyResult) -> dict:
    return {
        "release": result.release_name,
        "changed": result.changed,
        "version": result.version,
        "previous_version": result.previous_version,
        "created_release": result.created_release,
        "diff": result.diff,
    }


class PlanViewSet(viewsets.GenericViewSet):
    """``/api/plans/validate/`` and ``/api/plans/apply/``: a plan document in, every
    error out. Send ``{"document": ...}`` as JSON, or the YAML itself with
    ``Content-Type: application/yaml``."""

    parser_classes = [JSONParser, YAMLParser, TextYAMLParser]
    serializer_class = PlanSourceSerializer

    def get_permissions(self):
        if self.action == "apply":
            return [IsRolloutAdmin()]
        return [IsStaff()]

    @extend_schema(
        summary="Validate a plan and show its diff against the active version (stores nothing)",
        request=PLAN_REQUEST,
        responses={200: PlanValidateResultSerializer, 400: PLAN_INVALID},
    )
    @action(detail=False, methods=["post"])
    def validate(self, request):
        text, _ = _plan_source(request)
        result = apply_plan(text, actor=request.user, dry_run=True)
        return Response({"valid": True, **_result(result)})

    @extend_schema(
        summary="Apply a plan as the release's next version (rollout admin)",
        request=PLAN_REQUEST,
        parameters=[COMMENT_PARAM],
        responses={
            201: PlanApplyResultSerializer,
            200: OpenApiResponse(
                PlanApplyResultSerializer, description="Equal to the active version: unchanged."
            ),
            400: PLAN_INVALID,
        },
    )
    @action(detail=False, methods=["post"])
    def apply(self, request):
        text, comment = _plan_source(request)
        result = apply_plan(text, actor=request.user, comment=comment)
        if not result.changed:
            body = {"changed": False, "release": result.release_name, "version": result.version}
            return Response(body, status=status.HTTP_200_OK)
        return Response(_result(result), status=status.HTTP_201_CREATED)


# --- transitions -----------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(
        summary="Stage transitions, newest first",
        parameters=[
            OpenApiParameter(
                "release", OpenApiTypes.STR, description="Only this release (public_id or name)."
            )
        ],
    ),
    retrieve=extend_schema(summary="One stage transition"),
)
class TransitionViewSet(viewsets.ReadOnlyModelViewSet):
    lookup_field = "public_id"
    permission_classes = [StaffReadAdminWrite]
    serializer_class = TransitionSerializer
    pagination_class = cursor_pagination("-created_at")

    def get_queryset(self):
        queryset = StageTransition.objects.select_related("release", "plan", "actor")
        release = self.request.query_params.get("release")
        if release:
            queryset = queryset.filter(Q(release__public_id=release) | Q(release__name=release))
        return queryset


# --- reviews, approvals, incidents ------------------------------------------------------------

RELEASE_FILTER = OpenApiParameter(
    "release", OpenApiTypes.STR, description="Only this release (public_id or name)."
)


def _by_release(queryset, request):
    release = request.query_params.get("release")
    if release:
        queryset = queryset.filter(Q(release__public_id=release) | Q(release__name=release))
    return queryset


@extend_schema_view(
    list=extend_schema(summary="Stage reviews, newest first", parameters=[RELEASE_FILTER]),
    retrieve=extend_schema(summary="One review with its approvals and whether they count"),
)
class ReviewViewSet(mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    """Reviews are immutable. Requesting one (POST) evaluates the release now; the
    requester cannot approve it. Reviewers approve or reject; the approval that
    completes the plan's count advances the release."""

    lookup_field = "public_id"
    pagination_class = cursor_pagination("-created_at")

    def get_permissions(self):
        if self.action in ("approve", "reject"):
            return [IsReviewer()]
        if self.action == "advance":
            return [IsRolloutAdmin()]
        return [StaffReadReviewerOrAdminWrite()]

    def get_queryset(self):
        queryset = Review.objects.select_related("release", "plan", "requested_by")
        if self.action == "retrieve":
            queryset = queryset.prefetch_related("approvals__reviewer", "approvals__plan")
        return _by_release(queryset, self.request)

    def get_serializer_class(self):
        if self.action == "create":
            return ReviewRequestSerializer
        return ReviewDetailSerializer if self.action == "retrieve" else ReviewSerializer

    @extend_schema(
        summary="Review a release's current stage now (reviewer or rollout admin)",
        request=ReviewRequestSerializer,
        responses={201: ReviewDetailSerializer, 409: ErrorSerializer},
    )
    def create(self, request, *args, **kwargs):
        serializer = ReviewRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        name = serializer.validated_data["release"]
        release = get_object_or_404(Release, Q(public_id=name) | Q(name=name))
        review = create_review(release, trigger=ReviewTrigger.API, requested_by=request.user)
        return Response(ReviewDetailSerializer(review).data, status=status.HTTP_201_CREATED)

    def _verdict(self, request, verdict: str) -> Response:
        serializer = VerdictSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        result = transitions.approve(
            self.get_object(),
            reviewer=request.user,
            verdict=verdict,
            comment=serializer.validated_data["comment"],
        )
        body = ApproveResultSerializer(result).data
        return Response(body, status=status.HTTP_201_CREATED if result.created else 200)

    @extend_schema(
        summary="Approve a review recommending advance (reviewer, not its requester)",
        request=VerdictSerializer,
        responses={201: ApproveResultSerializer, 403: ErrorSerializer, 409: ErrorSerializer},
    )
    @action(detail=True, methods=["post"])
    def approve(self, request, public_id=None):
        return self._verdict(request, Verdict.APPROVE)

    @extend_schema(
        summary="Reject a review: its advance cannot happen (reviewer)",
        request=VerdictSerializer,
        responses={201: ApproveResultSerializer, 403: ErrorSerializer, 409: ErrorSerializer},
    )
    @action(detail=True, methods=["post"])
    def reject(self, request, public_id=None):
        return self._verdict(request, Verdict.REJECT)

    @extend_schema(
        summary="Carry out an approved advance (rollout admin; for plans needing no approvals)",
        request=None,
        responses={201: TransitionSerializer, 200: TransitionSerializer, 409: ErrorSerializer},
    )
    @action(detail=True, methods=["post"])
    def advance(self, request, public_id=None):
        transition, created = transitions.advance(self.get_object(), actor=request.user)
        return Response(
            TransitionSerializer(transition).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


@extend_schema_view(
    list=extend_schema(summary="Approvals and rejections, newest first"),
    retrieve=extend_schema(summary="One approval"),
)
class ApprovalViewSet(viewsets.ReadOnlyModelViewSet):
    lookup_field = "public_id"
    permission_classes = [StaffReadAdminWrite]
    serializer_class = ApprovalSerializer
    pagination_class = cursor_pagination("-created_at")
    queryset = Approval.objects.select_related("review", "reviewer", "plan")


@extend_schema_view(
    list=extend_schema(summary="Incidents, newest first", parameters=[IncidentFilterSerializer]),
    retrieve=extend_schema(summary="One incident"),
    create=extend_schema(summary="File an incident (reviewer or rollout admin)"),
)
class IncidentViewSet(mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    """Filing an incident runs the release's incident tripwires at once."""

    lookup_field = "public_id"
    permission_classes = [StaffReadReviewerOrAdminWrite]
    serializer_class = IncidentSerializer
    pagination_class = cursor_pagination("-created_at")

    def get_queryset(self):
        queryset = Incident.objects.select_related("release", "opened_by", "resolved_by")
        if self.action == "list":
            state = query_filters(self.request, IncidentFilterSerializer).get("status")
            if state:
                queryset = queryset.filter(status=state)
        return _by_release(queryset, self.request)

    def perform_create(self, serializer):
        data = serializer.validated_data
        serializer.instance = incidents.file_incident(
            data["release"],
            severity=data["severity"],
            title=data["title"],
            description=data.get("description", ""),
            stage=data.get("stage"),
            actor=self.request.user,
        )

    @extend_schema(
        summary="Resolve an incident, saying how (reviewer or rollout admin)",
        request=ResolveSerializer,
        responses={200: IncidentSerializer},
    )
    @action(detail=True, methods=["post"])
    def resolve(self, request, public_id=None):
        serializer = ResolveSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        incident = incidents.resolve_incident(
            self.get_object(),
            actor=request.user,
            resolution=serializer.validated_data["resolution"],
        )
        return Response(IncidentSerializer(incident).data)
