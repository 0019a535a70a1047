"""The console's URLs (part of the interface: docs and tests name them)."""

from django.urls import path

from console.views import access, auth, board, release, usage

app_name = "console"

urlpatterns = [
    path("login/", auth.login, name="login"),
    path("logout/", auth.logout, name="logout"),
    path("password/", auth.password_change, name="password_change"),
    path("password/done/", auth.password_change_done, name="password_change_done"),
    path("", board.board, name="board"),
    path("releases/<str:name>/", release.release, name="release"),
    path("usage/", usage.usage, name="usage"),
    path("usage/csv/", usage.usage_csv, name="usage_csv"),
    path("access/", access.access, name="access"),
]
