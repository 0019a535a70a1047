"""The access API: organizations, their members, verifications and API keys.

Visibility is the queryset (``stagegate.permissions.scope_to_orgs``): an org admin
works only with the organizations they administer, and anything else answers 404
exactly as if it did not exist. Only then do role checks apply (403). The work
itself is done by the service modules (``access.keys``, ``access.organizations``,
``access.verifications``), which audit every change.
"""

from __future__ import annotations

from datetime import timedelta

from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from access import keys, organizations, verifications
from access.models import ApiKey, Membership, Organization, Verification
from access.serializers import (
    ApiKeyCreateSerializer,
    ApiKeyRevokeSerializer,
    ApiKeyRotateSerializer,
    ApiKeySerializer,
    IssuedKeySerializer,
    MembershipSerializer,
    OrganizationDetailSerializer,
    OrganizationSerializer,
    VerificationCreateSerializer,
    VerificationRevokeSerializer,
    VerificationSerializer,
    VerificationValidateSerializer,
)
from stagegate.api import ErrorSerializer, cursor_pagination
from stagegate.permissions import (
    IsRolloutAdmin,
    OrgScopedAdminWrite,
    StaffOrOrgAdmin,
    scope_to_orgs,
)

NOT_FOUND = OpenApiResponse(ErrorSerializer, description="Not found, or not yours to see.")
CONFLICT = OpenApiResponse(ErrorSerializer, description="The object's state forbids this.")
INVALID = OpenApiResponse(ErrorSerializer, description="Invalid input (`details` per field).")

ORGANIZATION_FILTER = OpenApiParameter(
    "organization", OpenApiTypes.STR, description="Only this organization's (its public_id)."
)


def _visible_org(request, public_id: str) -> Organization:
    """The organization the request may touch, or 404 (also when it exists elsewhere)."""
    return get_object_or_404(
        scope_to_orgs(Organization.objects.all(), request, "pk"), public_id=public_id
    )


# --- organizations ---------------------------------------------------------------------------

SLUG_IS_FIXED = (
    "The slug is fixed at creation: rollout plans name organizations by slug, so a "
    "different slug is refused with 400 `slug_immutable`."
)


@extend_schema_view(
    list=extend_schema(summary="List organizations (org admins: only their own)"),
    retrieve=extend_schema(summary="An organization with its effective tier per release"),
    create=extend_schema(summary="Create an organization (rollout admin)"),
    update=extend_schema(
        summary="Change an organization (rollout admin)", description=SLUG_IS_FIXED
    ),
    partial_update=extend_schema(
        summary="Change some fields of an organization (rollout admin)",
        description=SLUG_IS_FIXED,
    ),
)
class OrganizationViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    lookup_field = "public_id"
    pagination_class = cursor_pagination("slug")

    def get_permissions(self):
        if self.action == "create":
            return [IsRolloutAdmin()]
        return [OrgScopedAdminWrite()]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Organization.objects.none()
        return scope_to_orgs(Organization.objects.all(), self.request, "pk")

    def get_serializer_class(self):
        if self.action == "retrieve":
            return OrganizationDetailSerializer
        return OrganizationSerializer

    def perform_create(self, serializer):
        serializer.instance = organizations.create_organization(
            **serializer.validated_data, actor=self.request.user
        )

    def perform_update(self, serializer):
        serializer.instance = organizations.update_organization(
            serializer.instance, actor=self.request.user, **serializer.validated_data
        )


ORG_PATH = OpenApiParameter(
    "org_public_id", OpenApiTypes.STR, OpenApiParameter.PATH, description="The organization."
)


@extend_schema_view(
    list=extend_schema(summary="Members of an organization", parameters=[ORG_PATH]),
    create=extend_schema(
        summary="Add a member (rollout admin or the organization's org admin)",
        description="A rollout admin adds any active user. An org admin adds only an "
        "active user with no staff standing who is not a member of an organization they "
        "do not administer; every other username, whether it exists or not, gets the same "
        "400 (`username`: no user you may add has this username).",
        parameters=[ORG_PATH],
        responses={201: MembershipSerializer, 400: INVALID, 404: NOT_FOUND, 409: CONFLICT},
    ),
    retrieve=extend_schema(summary="One membership", parameters=[ORG_PATH]),
    destroy=extend_schema(
        summary="Remove a member (rollout admin or the organization's org admin)",
        parameters=[ORG_PATH],
    ),
)
class MembershipViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Memberships of one organization, at ``/api/orgs/{org_public_id}/members/``."""

    lookup_field = "public_id"
    permission_classes = [StaffOrOrgAdmin]
    serializer_class = MembershipSerializer
    pagination_class = cursor_pagination("created_at")

    def organization(self) -> Organization:
        if not hasattr(self, "_organization"):
            self._organization = _visible_org(self.request, self.kwargs["org_public_id"])
        return self._organization

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Membership.objects.none()
        return Membership.objects.filter(organization=self.organization()).select_related(
            "user", "organization"
        )

    def perform_create(self, serializer):
        serializer.instance = organizations.add_member(
            organization=self.organization(),
            username=serializer.validated_data["username"],
            role=serializer.validated_data["role"],
            actor=self.request.user,
        )

    def perform_destroy(self, instance):
        organizations.remove_member(instance, actor=self.request.user)


# --- verifications ---------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(
        summary="List verifications (org admins: their organizations')",
        parameters=[ORGANIZATION_FILTER],
    ),
    retrieve=extend_schema(summary="One verification"),
)
class VerificationViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    lookup_field = "public_id"
    permission_classes = [OrgScopedAdminWrite]
    serializer_class = VerificationSerializer
    pagination_class = cursor_pagination("-created_at")

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Verification.objects.none()
        queryset = Verification.objects.select_related("organization", "verified_by")
        organization = self.request.query_params.get("organization")
        if organization:
            queryset = queryset.filter(organization__public_id=organization)
        return scope_to_orgs(queryset, self.request)

    def _reply(self, verification: Verification, status_code: int = status.HTTP_200_OK):
        return Response(VerificationSerializer(verification).data, status=status_code)

    @extend_schema(
        summary="Record a verification (rollout admin)",
        request=VerificationCreateSerializer,
        responses={201: VerificationSerializer, 400: INVALID, 404: NOT_FOUND},
    )
    def create(self, request):
        serializer = VerificationCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        organization = _visible_org(request, data.pop("organization"))
        self.check_object_permissions(request, organization)
        verification = verifications.create_verification(
            organization=organization, actor=request.user, **data
        )
        return self._reply(verification, status.HTTP_201_CREATED)

    @extend_schema(
        summary="Revoke a verification (rollout admin)",
        request=VerificationRevokeSerializer,
        responses={200: VerificationSerializer, 404: NOT_FOUND, 409: CONFLICT},
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request, public_id=None):
        verification = self.get_object()
        serializer = VerificationRevokeSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        verification = verifications.revoke_verification(
            verification, actor=request.user, reason=serializer.validated_data["reason"]
        )
        return self._reply(verification)

    @extend_schema(
        summary="Mark a pending verification valid (rollout admin)",
        request=VerificationValidateSerializer,
        responses={200: VerificationSerializer, 404: NOT_FOUND, 409: CONFLICT},
    )
    @action(detail=True, methods=["post"])
    def validate(self, request, public_id=None):
        verification = self.get_object()
        serializer = VerificationValidateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        verification = verifications.validate_verification(
            verification, actor=request.user, note=serializer.validated_data["note"]
        )
        return self._reply(verification)


# --- API keys --------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(
        summary="List API keys (metadata only; org admins: their organizations')",
        parameters=[ORGANIZATION_FILTER],
    ),
    retrieve=extend_schema(summary="One API key (metadata only, never the secret)"),
)
class ApiKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """API keys. Rollout admins manage every organization's keys, org admins their own
    organizations'; reviewers and viewers read metadata."""

    lookup_field = "public_id"
    permission_classes = [StaffOrOrgAdmin]
    serializer_class = ApiKeySerializer
    pagination_class = cursor_pagination("-created_at")

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return ApiKey.objects.none()
        queryset = ApiKey.objects.select_related("organization", "rotated_from")
        organization = self.request.query_params.get("organization")
        if organization:
            queryset = queryset.filter(organization__public_id=organization)
        return scope_to_orgs(queryset, self.request)

    def get_serializer_context(self):
        return {**super().get_serializer_context(), "now": timezone.now()}

    def _issued(self, issued: keys.IssuedKey):
        context = {**self.get_serializer_context(), "raw_key": issued.raw_key}
        data = IssuedKeySerializer(issued.api_key, context=context).data
        # The reply carries a secret: no cache anywhere may keep it.
        return Response(data, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})

    @extend_schema(
        summary="Issue an API key; the reply shows the raw key once",
        request=ApiKeyCreateSerializer,
        responses={201: IssuedKeySerializer, 400: INVALID, 404: NOT_FOUND},
    )
    def create(self, request):
        serializer = ApiKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        organization = _visible_org(request, data.pop("organization"))
        issued = keys.issue_key(organization=organization, actor=request.user, **data)
        return self._issued(issued)

    @extend_schema(
        summary="Revoke an API key at once",
        request=ApiKeyRevokeSerializer,
        responses={200: ApiKeySerializer, 404: NOT_FOUND},
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request, public_id=None):
        api_key = self.get_object()
        serializer = ApiKeyRevokeSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        api_key = keys.revoke_key(
            api_key=api_key, actor=request.user, reason=serializer.validated_data["reason"]
        )
        return Response(self.get_serializer(api_key).data)

    @extend_schema(
        summary="Rotate an API key: a successor now, the old key expires after the grace",
        request=ApiKeyRotateSerializer,
        responses={201: IssuedKeySerializer, 404: NOT_FOUND, 409: CONFLICT},
    )
    @action(detail=True, methods=["post"])
    def rotate(self, request, public_id=None):
        api_key = self.get_object()
        serializer = ApiKeyRotateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        grace = timedelta(hours=serializer.validated_data["grace_hours"])
        issued = keys.rotate_key(api_key=api_key, actor=request.user, grace=grace)
        return self._issued(issued)
