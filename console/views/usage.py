"""Usage per release, stage, tier and organization over a chosen period, with its
totals as CSV. Read from the rollups only (``monitoring.usage_report``): what a page
costs does not grow with the number of usage events.

Fine-tuning over the same period and filters (``console.tuning_selectors.fine_tuning_usage``,
two grouped queries on the jobs and assessments) is a second table with a CSV of its own:
its rows are per (release, stage, tier, organization), not the totals CSV's groups."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django import forms
from django.http import HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.http import urlencode

from access.models import Organization, Tier
from console.charts import Series, bar_chart, format_value, line_chart
from console.guards import staff_page
from console.tuning_selectors import (
    USAGE_COLUMNS,
    FineTuningUsageRow,
    fine_tuning_usage,
    fine_tuning_usage_total,
)
from monitoring.usage_report import UsageFigures, UsageReport, usage_report
from rollout.models import Release
from rollout.plans import plan_doc

RANGES = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
DEFAULTS = {"range": "7d", "group_by": "tier"}
EARLIEST = date(2000, 1, 1)
LONGEST = timedelta(days=92)


def _choice(label: str, choices: list[tuple[str, str]], *, everything: str) -> forms.ChoiceField:
    return forms.ChoiceField(
        label=label,
        required=False,
        choices=[("", everything), *choices],
        # The default message repeats the value sent, which may be anything.
        error_messages={"invalid_choice": f"Choose a {label.lower()} from the list."},
    )


class UsageFilter(forms.Form):
    """The page's filters. Every value is checked against a list or parsed as a date, so
    no text from the query string reaches the database."""

    # release, stage, tier and org are added by __init__, with their choices.
    range = forms.ChoiceField(
        label="Period",
        required=False,
        choices=[
            ("24h", "last 24 hours"),
            ("7d", "last 7 days"),
            ("30d", "last 30 days"),
        ],
        error_messages={"invalid_choice": "Choose 24 hours, 7 days or 30 days."},
    )
    start = forms.DateField(
        label="From (UTC; with To, instead of the period)",
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        error_messages={"invalid": "Enter a date as YYYY-MM-DD."},
    )
    end = forms.DateField(
        label="To (UTC, included)",
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        error_messages={"invalid": "Enter a date as YYYY-MM-DD."},
    )
    group_by = forms.ChoiceField(
        label="Totals by",
        choices=[("tier", "tier"), ("org", "organization")],
        error_messages={"invalid_choice": "Choose tier or organization."},
    )

    def __init__(self, data, *, releases, stages, orgs) -> None:
        super().__init__(data)
        self.fields["release"] = _choice(
            "Release", [(name, name) for name in releases], everything="all releases"
        )
        self.fields["stage"] = _choice(
            "Stage", [(name, name) for name in stages], everything="all stages"
        )
        self.fields["tier"] = _choice("Tier", list(Tier.choices), everything="all tiers")
        self.fields["org"] = _choice(
            "Organization", [(slug, slug) for slug in orgs], everything="all organizations"
        )
        self.order_fields(["release", "stage", "tier", "org", "range", "start", "end", "group_by"])

    def _check_date(self, name: str) -> date | None:
        value = self.cleaned_data.get(name)
        if value is not None and not EARLIEST <= value <= timezone.now().date():
            raise forms.ValidationError(
                f"Choose a date from {EARLIEST:%Y-%m-%d} to today.", code="out_of_range"
            )
        return value

    def clean_start(self) -> date | None:
        return self._check_date("start")

    def clean_end(self) -> date | None:
        return self._check_date("end")

    def clean(self) -> dict:
        data = super().clean()
        start, end = data.get("start"), data.get("end")
        if "start" in self.errors or "end" in self.errors:
            return data
        if (start is None) != (end is None):
            self.add_error("end" if start else "start", "Give both dates, or neither.")
        elif start and end:
            if end < start:
                self.add_error("end", "The To date is before the From date.")
            elif end - start >= LONGEST:
                self.add_error("end", f"Choose at most {LONGEST.days} days.")
        return data

    def period(self, now: datetime) -> tuple[datetime, datetime]:
        """[since, until) in UTC: the two dates as whole days (the last one included,
        up to now), or the chosen period back from now."""
        data = self.cleaned_data
        if data.get("start") and data.get("end"):
            since = datetime.combine(data["start"], time(), tzinfo=UTC)
            until = datetime.combine(data["end"] + timedelta(days=1), time(), tzinfo=UTC)
            return since, min(until, now)
        return now - RANGES[data.get("range") or DEFAULTS["range"]], now


@dataclass(frozen=True)
class Filters:
    form: UsageFilter
    org_ids: dict[str, str]  # slug -> public id
    org_slugs: dict[str, str]  # public id -> slug


def _filters(request) -> Filters:
    """The filter form bound to the query string (the defaults when it is empty), with
    its choices: two queries (releases with their plans, organizations)."""
    releases = list(Release.objects.select_related("active_plan").order_by("name"))
    stages: list[str] = []
    for found in releases:
        names = plan_doc(found.active_plan).stage_names if found.active_plan else []
        stages += [name for name in [*names, found.current_stage] if name not in stages]
    orgs = dict(Organization.objects.order_by("slug").values_list("slug", "public_id"))
    data = {**DEFAULTS, **request.GET.dict()} if request.GET else DEFAULTS
    form = UsageFilter(
        data, releases=[found.name for found in releases], stages=stages, orgs=list(orgs)
    )
    return Filters(form, orgs, {public_id: slug for slug, public_id in orgs.items()})


def _report(filters: Filters) -> UsageReport:
    data = filters.form.cleaned_data
    since, until = filters.form.period(timezone.now())
    return usage_report(
        since=since,
        until=until,
        release=data["release"],
        stage=data["stage"],
        tier=data["tier"],
        org=filters.org_ids.get(data["org"], ""),
        group_by=data["group_by"],
    )


def _fine_tuning(filters: Filters) -> list[FineTuningUsageRow]:
    data = filters.form.cleaned_data
    since, until = filters.form.period(timezone.now())
    return fine_tuning_usage(
        since=since,
        until=until,
        release=data["release"],
        stage=data["stage"],
        tier=data["tier"],
        org=data["org"],
    )


def _label(report: UsageReport, key: str, slugs: dict[str, str]) -> str:
    if report.group_by == "org":
        return slugs.get(key, key) or "(no organization)"
    return key or "(no tier)"


def _percent(value: float | None) -> str:
    return "—" if value is None else format_value(value, "%")


def _rows(report: UsageReport, slugs: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The table as text: one row per group, then the total; counts with thousands
    separators, rates as percentages of admitted requests."""
    named = [(_label(report, key, slugs), figures) for key, figures in report.groups]
    return [
        (
            label,
            [
                f"{f.requests:,}",
                f"{f.allowed:,}",
                f"{f.denied:,}",
                f"{f.errors:,}",
                _percent(f.error_rate),
                f"{f.flagged:,}",
                _percent(f.flag_rate),
                f"{f.prompt_tokens:,}",
                f"{f.completion_tokens:,}",
            ],
        )
        for label, f in [*named, ("total", report.total)]
    ]


def _charts(report: UsageReport) -> dict:
    step = int(report.step.total_seconds())
    unit = "hour" if step == 3600 else "day"
    # Zero bars would draw an empty frame; no points draws "No data in this range yet."
    points = report.series if report.total.requests else []

    def series(name: str, value, css: str = "") -> Series:
        return Series(name, [(moment, float(value(f))) for moment, f in points], css=css)

    def rate(name: str, value) -> Series:
        return Series(name, [(m, value(f)) for m, f in points if value(f) is not None])

    return {
        "requests": bar_chart(
            title=f"Requests per {unit}",
            series=[
                series("admitted", lambda f: f.allowed),
                series("refused", lambda f: f.denied, "refused"),
            ],
            bucket_seconds=step,
            y_unit="req",
        ),
        "tokens": bar_chart(
            title=f"Tokens per {unit} (admitted requests)",
            series=[
                series("prompt", lambda f: f.prompt_tokens),
                series("completion", lambda f: f.completion_tokens),
            ],
            bucket_seconds=step,
            y_unit="tok",
        ),
        "rates": line_chart(
            title=f"Error and flag rates per {unit} (of admitted requests)",
            series=[
                rate("errors", lambda f: f.error_rate),
                rate("flagged", lambda f: f.flag_rate),
            ],
            y_unit="%",
            empty_message="Nothing admitted in this range.",
        ),
    }


def _query(filters: Filters) -> str:
    """The valid filters as a query string, for the CSV link."""
    data = filters.form.cleaned_data
    values = {name: data[name] for name in ("release", "stage", "tier", "org", "group_by")}
    if data.get("start") and data.get("end"):
        values.update(start=data["start"].isoformat(), end=data["end"].isoformat())
    else:
        values["range"] = data.get("range") or DEFAULTS["range"]
    return urlencode({name: value for name, value in values.items() if value})


@staff_page
def usage(request):
    filters = _filters(request)
    context: dict = {"form": filters.form}
    if filters.form.is_valid():
        report = _report(filters)
        fine_tuning = _fine_tuning(filters)
        context.update(
            report=report,
            charts=_charts(report),
            rows=_rows(report, filters.org_slugs),
            query=_query(filters),
            fine_tuning=fine_tuning,
            fine_tuning_total=fine_tuning_usage_total(fine_tuning),
        )
    status = 200 if "report" in context else 400
    return render(request, "console/usage.html", context, status=status)


def _cell(value: str) -> str:
    """A text cell that a spreadsheet will not run as a formula."""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


@staff_page
def usage_csv(request):
    filters = _filters(request)
    if not filters.form.is_valid():
        return render(request, "console/usage.html", {"form": filters.form}, status=400)
    report = _report(filters)
    name = f"usage-{report.since:%Y%m%dT%H%M}-{report.until:%Y%m%dT%H%M}-by-{report.group_by}"
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}.csv"'
    writer = csv.writer(response)
    writer.writerow(
        [
            "organization" if report.group_by == "org" else "tier",
            "requests",
            "admitted",
            "refused",
            "errors",
            "error_rate",
            "flagged",
            "flag_rate",
            "prompt_tokens",
            "completion_tokens",
        ]
    )
    rows: list[tuple[str, UsageFigures]] = [
        (_label(report, key, filters.org_slugs), figures) for key, figures in report.groups
    ]
    for label, f in [*rows, ("total", report.total)]:
        writer.writerow(
            [
                _cell(label),
                f.requests,
                f.allowed,
                f.denied,
                f.errors,
                _rate(f.error_rate),
                f.flagged,
                _rate(f.flag_rate),
                f.prompt_tokens,
                f.completion_tokens,
            ]
        )
    return response


@staff_page
def usage_fine_tuning_csv(request):
    """The page's fine-tuning table as CSV: one line per (release, stage, tier,
    organization), then the total (its four key cells ``total`` and empty)."""
    filters = _filters(request)
    if not filters.form.is_valid():
        return render(request, "console/usage.html", {"form": filters.form}, status=400)
    since, until = filters.form.period(timezone.now())
    rows = _fine_tuning(filters)
    name = f"usage-fine-tuning-{since:%Y%m%dT%H%M}-{until:%Y%m%dT%H%M}"
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}.csv"'
    writer = csv.writer(response)
    writer.writerow(["release", "stage", "tier", "organization", *USAGE_COLUMNS])
    for found in rows:
        keys = (found.release, found.stage, found.tier, found.org)
        writer.writerow([*(_cell(key) for key in keys), *found.counts])
    writer.writerow(["total", "", "", "", *fine_tuning_usage_total(rows)])
    return response
