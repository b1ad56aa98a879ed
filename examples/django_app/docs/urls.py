from django.urls import path

from docs import views

urlpatterns = [
    path("documents/", views.documents, name="documents"),
    path("documents/<int:pk>/", views.document, name="document"),
]
