"""The Celery farm only: the app, a thin batch task, the process runtime, admission, the reclaimer."""
