"""The console's URLs (part of the interface: docs and tests name them)."""

from django.urls import path

from console.views import (
    access,
    actions,
    audit,
    auth,
    board,
    flags,
    incidents,
    orgs,
    release,
    reviews,
    tuning,
    usage,
)

app_name = "console"

urlpatterns = [
    path("login/", auth.login, name="login"),
    path("logout/", auth.logout, name="logout"),
    path("password/", auth.password_change, name="password_change"),
    path("password/done/", auth.password_change_done, name="password_change_done"),
    path("", board.board, name="board"),
    path("releases/<str:name>/", release.release, name="release"),
    path("releases/<str:name>/plans/", release.plans, name="release_plans"),
    path("releases/<str:name>/plans/diff/", release.plan_diff, name="release_plan_diff"),
    # actions on a release and the review queue (console/views/actions.py, reviews.py)
    path("releases/<str:name>/review/", actions.request_review, name="request_review"),
    path("releases/<str:name>/pause/", actions.pause, name="pause"),
    path("releases/<str:name>/resume/", actions.resume, name="resume"),
    path("releases/<str:name>/rollback/", actions.rollback, name="rollback"),
    path("reviews/", reviews.reviews, name="reviews"),
    path("reviews/<slug:public_id>/", reviews.review, name="review"),
    path("reviews/<slug:public_id>/approve/", actions.approve, name="review_approve"),
    path("reviews/<slug:public_id>/reject/", actions.reject, name="review_reject"),
    path("usage/", usage.usage, name="usage"),
    path("usage/csv/", usage.usage_csv, name="usage_csv"),
    path("usage/fine-tuning/csv/", usage.usage_fine_tuning_csv, name="usage_fine_tuning_csv"),
    path("access/", access.access, name="access"),
    # incidents and the audit log (console/views/incidents.py, audit.py)
    path("incidents/", incidents.incidents, name="incidents"),
    path("incidents/file/", incidents.incident_file, name="incident_file"),
    path("incidents/<slug:public_id>/", incidents.incident, name="incident"),
    path("incidents/<slug:public_id>/update/", incidents.incident_update, name="incident_update"),
    path(
        "incidents/<slug:public_id>/resolve/", incidents.incident_resolve, name="incident_resolve"
    ),
    # the flag review queue (console/views/flags.py)
    path("flags/", flags.flags, name="flags"),
    path("flags/<int:pk>/decide/", flags.flag_decide, name="flag_decide"),
    # fine-tuning: the review queue, a job, reviewers' decisions (console/views/tuning.py)
    path("tuning/", tuning.tuning, name="tuning"),
    path("tuning/jobs/<str:public_id>/", tuning.tuning_job, name="tuning_job"),
    path(
        "tuning/jobs/<str:public_id>/dataset/",
        tuning.tuning_dataset_decide,
        name="tuning_decide_dataset",
    ),
    path(
        "tuning/jobs/<str:public_id>/model/", tuning.tuning_model_decide, name="tuning_decide_model"
    ),
    path("tuning/releases/<str:name>/", tuning.tuning_release, name="tuning_release"),
    path("audit/", audit.audit, name="audit"),
    path("audit/export.csv", audit.audit_csv, name="audit_csv"),
    path("audit/export.jsonl", audit.audit_jsonl, name="audit_jsonl"),
    path("audit/verify/", audit.audit_verify, name="audit_verify"),
    # organizations and keys (console/views/orgs.py)
    path("orgs/", orgs.orgs, name="orgs"),
    path("orgs/<slug:slug>/", orgs.org, name="org"),
    path("orgs/<slug:slug>/members/", orgs.member_add, name="member_add"),
    path(
        "orgs/<slug:slug>/members/<str:public_id>/remove/",
        orgs.member_remove,
        name="member_remove",
    ),
    path("orgs/<slug:slug>/verifications/", orgs.verification_add, name="verification_add"),
    path(
        "orgs/<slug:slug>/verifications/<str:public_id>/revoke/",
        orgs.verification_revoke,
        name="verification_revoke",
    ),
    path(
        "orgs/<slug:slug>/verifications/<str:public_id>/validate/",
        orgs.verification_validate,
        name="verification_validate",
    ),
    path("orgs/<slug:slug>/keys/new/", orgs.key_new, name="key_new"),
    path("keys/", orgs.keys_list, name="keys"),
    path("keys/<str:public_id>/", orgs.key, name="key"),
    path("keys/<str:public_id>/rotate/", orgs.key_rotate, name="key_rotate"),
    path("keys/<str:public_id>/revoke/", orgs.key_revoke, name="key_revoke"),
]
