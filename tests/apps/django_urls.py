"""URLconf and views of the Django test project. The test modules configure
Django with ``settings.configure(**SETTINGS)`` (``ROOT_URLCONF`` names this
module), for WSGI (tests/test_wsgi.py) and ASGI (tests/test_asgi.py) alike."""

from __future__ import annotations

import hashlib
import json

from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
    JsonResponse,
    StreamingHttpResponse,
)
from django.urls import path, reverse
from django.views.decorators.csrf import csrf_exempt

#: The minimal settings both test modules configure.
SETTINGS = {
    "DEBUG": False,
    "SECRET_KEY": "server-native-tests",
    "ALLOWED_HOSTS": ["127.0.0.1", "localhost"],
    "ROOT_URLCONF": "apps.django_urls",
    "INSTALLED_APPS": [],
    "MIDDLEWARE": ["django.middleware.common.CommonMiddleware"],
    "DATABASES": {},
    "USE_TZ": True,
    "DATA_UPLOAD_MAX_MEMORY_SIZE": 16 * 1024 * 1024,
    "FILE_UPLOAD_MAX_MEMORY_SIZE": 16 * 1024 * 1024,
    "LOGGING_CONFIG": None,
}


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse("django home", content_type="text/plain")


def item(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse(
        {
            "pk": pk,
            "url": reverse("item", args=[pk]),
            "absolute": request.build_absolute_uri(reverse("item", args=[pk])),
        }
    )


def meta(request: HttpRequest) -> JsonResponse:
    keys = [
        "REQUEST_METHOD",
        "SCRIPT_NAME",
        "PATH_INFO",
        "QUERY_STRING",
        "REMOTE_ADDR",
        "REMOTE_PORT",
        "SERVER_PROTOCOL",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
    ]
    return JsonResponse(
        {
            "meta": {key: request.META.get(key) for key in keys},
            "path": request.path,
            "path_info": request.path_info,
            "full_path": request.get_full_path(),
            "get": [[k, v] for k, values in request.GET.lists() for v in values],
            "host": request.get_host(),
            "scheme": request.scheme,
            "multi": request.META.get("HTTP_X_MULTI"),
        }
    )


@csrf_exempt
def echo_json(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"received": json.loads(request.body), "method": request.method})


@csrf_exempt
def form(request: HttpRequest) -> JsonResponse:
    files = {
        name: [
            {
                "name": f.name,
                "content_type": f.content_type,
                "size": f.size,
                "sha256": hashlib.sha256(f.read()).hexdigest(),
            }
            for f in request.FILES.getlist(name)
        ]
        for name in request.FILES
    }
    return JsonResponse({"form": {k: request.POST.getlist(k) for k in request.POST}, "files": files})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    count = int(request.GET.get("count", "3"))
    return StreamingHttpResponse((f"part-{i}\n" for i in range(count)), content_type="text/plain")


def file(request: HttpRequest) -> FileResponse:
    return FileResponse(open(request.GET["path"], "rb"), as_attachment=True, filename="data.bin")


def cookies(request: HttpRequest) -> JsonResponse:
    response = JsonResponse(dict(request.COOKIES))
    response.set_cookie("visited", "yes", httponly=True)
    return response


def missing(request: HttpRequest) -> HttpResponse:
    raise Http404("nothing here")


def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("boom (expected by the test)")


def go(request: HttpRequest) -> HttpResponseRedirect:
    return HttpResponseRedirect(reverse("index"))


urlpatterns = [
    path("", index, name="index"),
    path("items/<int:pk>/", item, name="item"),
    path("meta/", meta),
    path("json/", echo_json),
    path("form/", form),
    path("stream/", stream),
    path("file/", file),
    path("cookies/", cookies),
    path("missing/", missing),
    path("boom/", boom),
    path("go/", go),
]
