"""The stock django.contrib.auth views for login and the password-reset flow.

Only the views the benchmark drives are routed, with the names that the views
and the reset mail use to reverse each other's URLs. Logout and password
change are left out because their templates would come from the admin.
"""

from django.contrib.auth import views
from django.urls import path

urlpatterns = [
    path("login/", views.LoginView.as_view(), name="login"),
    path("password_reset/", views.PasswordResetView.as_view(), name="password_reset"),
    path(
        "password_reset/done/",
        views.PasswordResetDoneView.as_view(),
        name="password_reset_done",
    ),
    # Serves both steps: GET /reset/<uidb64>/<token>/ stores the token in the
    # session and redirects to /reset/<uidb64>/set-password/, which takes the
    # new password.
    path(
        "reset/<uidb64>/<token>/",
        views.PasswordResetConfirmView.as_view(),
        name="password_reset_confirm",
    ),
    path(
        "reset/done/",
        views.PasswordResetCompleteView.as_view(),
        name="password_reset_complete",
    ),
]
