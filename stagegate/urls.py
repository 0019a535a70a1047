from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import (
    SpectacularAPIView,
    SpectacularRedocView,
    SpectacularSwaggerSplitView,
)

from tuning import views as tuning

urlpatterns = [
    # OpenAI's files and fine-tuning routes (the proxy serves the rest of /v1/).
    path("v1/files", tuning.files),
    path("v1/files/<str:file_id>", tuning.file_detail),
    path("v1/fine_tuning/jobs", tuning.jobs),
    path("v1/fine_tuning/jobs/<str:job_id>", tuning.job_detail),
    path("v1/fine_tuning/jobs/<str:job_id>/cancel", tuning.job_cancel),
    path("v1/fine_tuning/jobs/<str:job_id>/events", tuning.job_events),
    path("", RedirectView.as_view(url="/console/", permanent=False)),
    path("console/", include("console.urls")),
    path("admin/", admin.site.urls),
    path("api/", include("stagegate.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves Swagger UI's start-up script as a file of its own, so the
    # Content-Security-Policy needs no inline script.
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
]
