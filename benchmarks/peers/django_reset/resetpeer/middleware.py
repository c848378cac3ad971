"""Middleware that turns off the CSRF checks which the auth views apply themselves."""

from asgiref.sync import iscoroutinefunction
from django.utils.decorators import sync_and_async_middleware


@sync_and_async_middleware
def skip_csrf_checks(get_response):
    """Mark every request as exempt from CSRF checks.

    Removing CsrfViewMiddleware is not enough, because LoginView and
    PasswordResetView wrap their dispatch() in csrf_protect, which would return
    403 to a POST without a token. The decorator skips its check for a request
    that carries ``_dont_enforce_csrf_checks``, the flag Django's test client
    sets (Django 5.2). Being both sync and async, this middleware adds no
    thread switch under ASGI.
    """
    if iscoroutinefunction(get_response):

        async def middleware_async(request):
            request._dont_enforce_csrf_checks = True
            return await get_response(request)

        return middleware_async

    def middleware(request):
        request._dont_enforce_csrf_checks = True
        return get_response(request)

    return middleware
