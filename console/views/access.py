"""The access explainer: the decision the proxy makes now for an organization or a key
and a release, and what the release's next stage would change (``access.explain``).

The form is read with GET (a link can name an organization and a release) or POST
(what the page's own form sends, so a key id typed into it stays out of URLs, browser
history and access logs). Text that holds a key's secret is refused and never shown
again, not even in the refused form.
"""

from __future__ import annotations

import re

from django import forms
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from access.explain import explain_access, limits_table
from access.models import Organization
from console.guards import staff_page
from monitoring.redaction import SECRET_PATTERN
from rollout.models import Release
from stagegate import keyformat

# A key id as people copy it: sgk_ and the 16 characters of its id (the prefix the
# console and the audit log show), or the 16 characters alone.
KEY_ID = re.compile(
    rf"(?:{keyformat.PREFIX})?(?P<key_id>[{keyformat.ID_ALPHABET}]{{{keyformat.ID_LENGTH}}})",
    re.IGNORECASE,
)
# Anything after "sgk_<id>_" is (part of) the secret: refused however short.
SECRET_TAIL = re.compile(rf"{keyformat.KEY_HEAD}[0-9a-z]", re.IGNORECASE)
SECRET_REFUSED = (
    "This looks like a whole API key, secret included. Enter only its id (sgk_ and the"
    " 16 characters before the second underscore); what you typed was not kept."
)


class AccessForm(forms.Form):
    organization = forms.ModelChoiceField(
        queryset=Organization.objects.order_by("slug"),
        to_field_name="slug",
        required=False,
        empty_label="(choose an organization)",
    )
    key = forms.CharField(
        label="or a key id",
        required=False,
        help_text="The key's id, e.g. sgk_0123456789abcdef, never its secret.",
        widget=forms.TextInput(
            attrs={"maxlength": 24, "autocomplete": "off", "spellcheck": "false"}
        ),
    )
    release = forms.ModelChoiceField(
        queryset=Release.objects.filter(active_plan__isnull=False)
        .select_related("active_plan")
        .order_by("name"),
        to_field_name="name",
        empty_label="(choose a release)",
    )

    def __init__(self, data=None, **kwargs):
        # A copy we may change: a refused key is blanked before the form is shown again.
        super().__init__(data.copy() if data is not None else None, **kwargs)

    def clean_key(self) -> str | None:
        text = self.cleaned_data["key"]
        if not text:
            return None
        if SECRET_PATTERN.search(text) or SECRET_TAIL.search(text):
            raise forms.ValidationError(SECRET_REFUSED, code="secret")
        match = KEY_ID.fullmatch(text)
        if match is None:
            raise forms.ValidationError(
                "Not a key id: sgk_ and 16 letters and digits, e.g. sgk_0123456789abcdef.",
                code="invalid",
            )
        return match["key_id"].lower()

    def clean(self):
        cleaned = super().clean()
        if "key" in self.errors:
            self.data["key"] = ""  # never echo what was refused: it may hold a secret
            return cleaned
        if cleaned.get("organization") is not None and cleaned.get("key"):
            raise forms.ValidationError("Choose an organization or a key id, not both.")
        if cleaned.get("organization") is None and not cleaned.get("key"):
            raise forms.ValidationError("Choose an organization or enter a key id.")
        return cleaned


@never_cache
@staff_page
def access(request):
    data = request.POST if request.method == "POST" else request.GET
    form = AccessForm(data) if data else AccessForm()
    explanation = None
    if data and form.is_valid():
        org = form.cleaned_data["organization"]
        explanation = explain_access(
            release=form.cleaned_data["release"],
            organization_pk=org.pk if org is not None else None,
            key_id=form.cleaned_data["key"],
        )
    return render(
        request,
        "console/access.html",
        {
            "form": form,
            "explanation": explanation,
            "limits_now": limits_table(explanation.now) if explanation else [],
            "limits_next": limits_table(explanation.next) if explanation else [],
        },
    )
