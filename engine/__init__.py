"""One process, one model, no Celery: engines, preparation, the step loop, model hosting, local runs."""
