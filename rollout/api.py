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
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser, JSONParser
from rest_framework.response import Response

from access.permissions import IsRolloutAdmin, IsStaff, StaffReadAdminWrite
from rollout.models import Release, RolloutPlan, StageTransition
from rollout.plan_schema import MAX_PLAN_BYTES
from rollout.plans import ApplyResult, apply_plan
from rollout.serializers import (
    PlanApplyResultSerializer,
    PlanDocumentSerializer,
    PlanSourceSerializer,
    PlanValidateResultSerializer,
    PlanVersionSerializer,
    ReleaseSerializer,
    TransitionSerializer,
)
from stagegate.api import ErrorSerializer, cursor_pagination


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
    lookup_field = "public_id"
    permission_classes = [StaffReadAdminWrite]
    serializer_class = ReleaseSerializer
    pagination_class = cursor_pagination("name")
    queryset = Release.objects.select_related("active_plan")


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
