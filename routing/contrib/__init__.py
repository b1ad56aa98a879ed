"""Framework integrations: write mixbatch's answers back into a Django or Flask app's own rows.

Both follow one pattern. The web process saves a row and enqueues a request *after its
transaction commits* (a rolled-back transaction enqueues nothing), naming the row in the
request's ``custom_id``; mixbatch runs the request and sends the result to a ready-made Celery
task on the app's own worker, which writes the answer into that row once, however many times
the result is delivered.

    routing.contrib.answers   framework-neutral: the custom_id format, ``Answer``, extraction of
                              the useful value (a vector, a text) from a provider-shaped body
    routing.contrib.common    the settings both read, ``PendingRequest``, building a request
    routing.contrib.django    a Django app: ``settings.MIXBATCH``, ``enqueue`` on
                              ``transaction.on_commit``, the ``mixbatch_django.store_answer`` task
    routing.contrib.flask     a Flask extension (``init_app``) over SQLAlchemy Core tables

Like ``routing.client``, nothing here imports mixbatch's ``config`` or ``tasks`` packages (a
Django project may well have packages of those names); Celery is imported only by the modules
that define tasks, which only the app's worker loads.
"""
