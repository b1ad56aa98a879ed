from django.urls import include, path

urlpatterns = [path("", include("docs.urls"))]
