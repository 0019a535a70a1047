"""Forms of the organization and key pages. Each field refuses what the service would
refuse (or could not store), so a bad input is an error beside its field and
changes nothing. Django's CharField already refuses NUL characters."""

from __future__ import annotations

import secrets

from django import forms
from django.conf import settings
from django.utils import timezone

from access.models import MembershipRole, VerificationKind, VerificationStatus
from access.serializers import MAX_GRACE_HOURS


class DateTimeInput(forms.DateTimeInput):
    input_type = "datetime-local"

    def __init__(self, **kwargs):
        super().__init__(format="%Y-%m-%dT%H:%M", **kwargs)


def _future(value):
    if value is not None and value <= timezone.now():
        raise forms.ValidationError("Must be in the future.")
    return value


class VerificationForm(forms.Form):
    kind = forms.ChoiceField(choices=VerificationKind.choices)
    status = forms.ChoiceField(
        choices=[
            (VerificationStatus.PENDING, "Pending (to be checked)"),
            (VerificationStatus.VALID, "Valid (evidence checked)"),
        ],
        initial=VerificationStatus.PENDING,
    )
    expires_at = forms.DateTimeField(
        label="Expires at (UTC)", widget=DateTimeInput(), validators=[_future]
    )
    evidence_note = forms.CharField(
        label="Note", required=False, max_length=2000, widget=forms.Textarea(attrs={"rows": 2})
    )


class VerificationRevokeForm(forms.Form):
    reason = forms.CharField(max_length=500)


class MemberForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=MembershipRole.choices, initial=MembershipRole.MEMBER)


class KeyCreateForm(forms.Form):
    # One token per form shown: a second POST of the same form (a reload of the page that
    # showed the secret) issues no second key (console.views.orgs.key_new).
    once = forms.CharField(widget=forms.HiddenInput, max_length=64)
    name = forms.CharField(max_length=100, help_text="What the key is for, e.g. batch-jobs.")
    expires_at = forms.DateTimeField(
        label="Expires at (UTC)",
        required=False,
        widget=DateTimeInput(),
        validators=[_future],
        help_text="Leave empty for a key that does not expire.",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["once"].initial = secrets.token_urlsafe(16)


class KeyRotateForm(forms.Form):
    grace_hours = forms.IntegerField(
        label="Grace period (hours)",
        min_value=0,
        max_value=MAX_GRACE_HOURS,
        help_text="How long the old key keeps working; 0 ends it at once.",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["grace_hours"].initial = settings.STAGEGATE_ROTATION_GRACE_HOURS


class KeyRevokeForm(forms.Form):
    reason = forms.CharField(max_length=200)
