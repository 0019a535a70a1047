"""Admin base classes: audited changes, and read-only views of records that change
only through their services."""

from __future__ import annotations

from django.contrib import admin
from django.db import transaction
from django.forms.models import model_to_dict

from monitoring import audit


def _public_id(obj) -> str:
    return getattr(obj, "public_id", None) or str(obj.pk)


class AuditedModelAdmin(admin.ModelAdmin):
    """Saves and deletes through the admin are audited as ``admin.<model>.<verb>``."""

    audit_exclude: tuple[str, ...] = ()

    def _audit(self, request, obj, verb: str, data: dict) -> None:
        audit.record(
            f"admin.{obj._meta.model_name}.{verb}",
            actor=request.user,
            object_type=audit.ObjectType.of_model(obj),
            object_id=_public_id(obj),
            data=data,
        )

    def _fields(self, obj, names) -> dict:
        values = model_to_dict(obj, fields=[n for n in names if n not in self.audit_exclude])
        return {name: str(value) if value is not None else None for name, value in values.items()}

    def save_model(self, request, obj, form, change):
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            changed = list(form.changed_data) if change else [f.name for f in obj._meta.fields]
            self._audit(request, obj, "changed" if change else "added", self._fields(obj, changed))

    def delete_model(self, request, obj):
        with transaction.atomic():
            self._audit(request, obj, "deleted", {"repr": str(obj)})
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            for obj in queryset:
                self._audit(request, obj, "deleted", {"repr": str(obj)})
            super().delete_queryset(request, queryset)

    def save_related(self, request, form, formsets, change):
        with transaction.atomic():
            super().save_related(request, form, formsets, change)
            for formset in formsets:
                for inline_obj in formset.new_objects + [o for o, _ in formset.changed_objects]:
                    self._audit(request, inline_obj, "saved", {"parent": _public_id(form.instance)})
                for inline_obj in formset.deleted_objects:
                    self._audit(
                        request, inline_obj, "deleted", {"parent": _public_id(form.instance)}
                    )


class ReadOnlyAdmin(admin.ModelAdmin):
    """Lists and shows records; adding, editing and deleting happen elsewhere."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
