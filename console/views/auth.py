"""Sign in, sign out and change one's password: Django's views with the console's
templates. Failed sign-ins are throttled per username and per address by django-axes
(settings ``AXES_*``)."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import reverse_lazy

login = auth_views.LoginView.as_view(
    template_name="console/login.html", redirect_authenticated_user=True
)
logout = auth_views.LogoutView.as_view(next_page=reverse_lazy("console:login"))
password_change = auth_views.PasswordChangeView.as_view(
    template_name="console/password_change.html",
    success_url=reverse_lazy("console:password_change_done"),
)
password_change_done = auth_views.PasswordChangeDoneView.as_view(
    template_name="console/password_change_done.html"
)
