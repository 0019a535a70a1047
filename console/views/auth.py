"""Sign in, sign out and change one's password: Django's views with the console's
templates. Failed sign-ins are throttled per username and per address by django-axes
(settings ``AXES_*``)."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.shortcuts import resolve_url
from django.urls import reverse_lazy

from stagegate.roles import can_read_all


class LoginView(auth_views.LoginView):
    template_name = "console/login.html"
    redirect_authenticated_user = True

    def get_default_redirect_url(self) -> str:
        """Staff land on the board; an org admin, for whom the board is closed, on their
        organizations (found by the browser tests: they landed on a 403)."""
        if self.next_page is None and not can_read_all(self.request.user):
            return resolve_url("console:orgs")
        return super().get_default_redirect_url()


login = LoginView.as_view()
logout = auth_views.LogoutView.as_view(next_page=reverse_lazy("console:login"))
password_change = auth_views.PasswordChangeView.as_view(
    template_name="console/password_change.html",
    success_url=reverse_lazy("console:password_change_done"),
)
password_change_done = auth_views.PasswordChangeDoneView.as_view(
    template_name="console/password_change_done.html"
)
