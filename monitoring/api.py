"""The audit log, read-only, for staff. Rows are named by their position in the
chain (``seq``), which is already part of what each row shows."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import serializers, viewsets

from monitoring.models import AuditEvent
from stagegate.api import cursor_pagination
from stagegate.permissions import StaffReadAdminWrite


class AuditEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = (
            "seq",
            "created_at",
            "actor",
            "action",
            "object_type",
            "object_id",
            "data",
            "hash",
            "prev_hash",
        )
        read_only_fields = fields


@extend_schema_view(
    list=extend_schema(
        summary="The audit log, newest first",
        parameters=[
            OpenApiParameter("action", OpenApiTypes.STR, description="e.g. key.revoked"),
            OpenApiParameter(
                "object_id", OpenApiTypes.STR, description="e.g. a key's or release's public_id"
            ),
        ],
    ),
    retrieve=extend_schema(summary="One audit row"),
)
class AuditEventViewSet(viewsets.ReadOnlyModelViewSet):
    lookup_field = "seq"
    lookup_value_regex = r"[0-9]+"
    permission_classes = [StaffReadAdminWrite]
    serializer_class = AuditEventSerializer
    pagination_class = cursor_pagination("-seq")

    def get_queryset(self):
        queryset = AuditEvent.objects.all()
        params = self.request.query_params
        if params.get("action"):
            queryset = queryset.filter(action=params["action"])
        if params.get("object_id"):
            queryset = queryset.filter(object_id=params["object_id"])
        return queryset
