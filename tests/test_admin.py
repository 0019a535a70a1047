"""The Django admin: every model is there, and every change made there is audited."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.contrib.auth.models import User
from django.urls import reverse

from access.keys import issue_key
from access.models import Organization
from monitoring.models import AuditEvent


@pytest.fixture
def root(db):
    return User.objects.create_superuser("root", "root@example.org", "root-pass-5521")


@pytest.fixture
def admin_client(client, root):
    client.force_login(root)
    return client


def _changelist(model) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def test_every_stagegate_model_has_an_admin():
    from django.apps import apps

    ours = [
        m for m in apps.get_models() if m._meta.app_label in ("access", "rollout", "monitoring")
    ]
    assert sorted(m.__name__ for m in ours if m not in admin.site._registry) == []


def test_every_admin_changelist_and_detail_renders(admin_client, release, northwind, ada):
    issue_key(organization=northwind, name="ci", actor=ada)
    for model in admin.site._registry:
        response = admin_client.get(_changelist(model))
        assert response.status_code == 200, model
        obj = model.objects.first()
        if obj is not None:
            url = reverse(
                f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[obj.pk]
            )
            assert admin_client.get(url).status_code == 200, model


def test_admin_change_is_audited_with_changed_fields(admin_client, northwind):
    url = reverse("admin:access_organization_change", args=[northwind.pk])
    response = admin_client.post(
        url,
        {
            "slug": northwind.slug,
            "name": "Northwind Research Ltd",
            "tier": "verified_commercial",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302
    event = AuditEvent.objects.get(action="admin.organization.changed")
    assert (event.actor, event.object_id) == ("root", northwind.public_id)
    assert event.object_type == "organization"  # what the snapshot reads, as the services write
    assert event.data == {"name": "Northwind Research Ltd", "tier": "verified_commercial"}
    assert Organization.objects.get(pk=northwind.pk).tier == "verified_commercial"


def test_every_audited_admin_model_has_an_object_type():
    # The admin records the changes it makes under the model's object type; a model
    # without one would fail the save (a 500) instead of being audited.
    from monitoring.admin_base import AuditedModelAdmin
    from monitoring.audit import ObjectType

    audited = [
        model
        for model, model_admin in admin.site._registry.items()
        if isinstance(model_admin, AuditedModelAdmin)
    ]
    inlines = [inline.model for model in audited for inline in admin.site._registry[model].inlines]
    assert {ObjectType.of_model(model) for model in audited + inlines} >= {
        ObjectType.ORGANIZATION,
        ObjectType.VERIFICATION,
        ObjectType.RELEASE,
        ObjectType.MEMBERSHIP,
        ObjectType.USER,
    }


def test_admin_cannot_rename_an_org_slug(admin_client, northwind):
    url = reverse("admin:access_organization_change", args=[northwind.pk])
    form = admin_client.get(url).content.decode()

    response = admin_client.post(
        url,
        {
            "slug": "renamed",
            "name": "Northwind Research",
            "tier": "public",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )

    assert 'name="slug"' not in form
    assert response.status_code == 302
    assert Organization.objects.get(pk=northwind.pk).slug == "northwind-research"
    event = AuditEvent.objects.get(action="admin.organization.changed")
    assert event.data == {"tier": "public"}


def test_admin_refuses_an_upper_case_org_slug(admin_client):
    response = admin_client.post(
        reverse("admin:access_organization_add"),
        {
            "slug": "Globex",
            "name": "Globex",
            "tier": "public",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {
        "slug": [
            "must be lower-case letters, digits, hyphens and underscores, starting with a"
            " letter or digit"
        ]
    }
    assert not Organization.objects.exists()


def test_admin_password_change_is_audited_without_the_password(admin_client, ada):
    url = reverse("admin:auth_user_password_change", args=[ada.pk])
    response = admin_client.post(
        url, {"password1": "n3w-Secret-pass!", "password2": "n3w-Secret-pass!"}
    )
    assert response.status_code == 302
    event = AuditEvent.objects.get(action="admin.user.password_changed")
    assert (event.actor, event.object_id) == ("root", str(ada.pk))
    dump = "".join(str(e.data) for e in AuditEvent.objects.all())
    assert "n3w-Secret-pass!" not in dump
    assert "pbkdf2" not in dump


def test_admin_revoke_action_revokes_and_audits(admin_client, northwind, ada):
    issued = issue_key(organization=northwind, name="ci", actor=ada)
    response = admin_client.post(
        _changelist(type(issued.api_key)),
        {"action": "revoke", "_selected_action": [issued.api_key.pk]},
    )
    assert response.status_code == 302
    issued.api_key.refresh_from_db()
    assert issued.api_key.revoked_at is not None
    assert AuditEvent.objects.get(action="key.revoked").actor == "root"


def test_audit_rows_cannot_be_edited_or_deleted_in_admin(admin_client, release):
    event = AuditEvent.objects.first()
    url = reverse("admin:monitoring_auditevent_change", args=[event.pk])
    admin_client.post(url, {"actor": "mallory"})
    delete_url = reverse("admin:monitoring_auditevent_delete", args=[event.pk])
    assert admin_client.post(delete_url, {"post": "yes"}).status_code == 403
    event.refresh_from_db()
    assert event.actor != "mallory"
