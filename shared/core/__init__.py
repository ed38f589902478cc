"""Infrastructure every service uses: settings, object storage, the Celery queue, logs, error values."""
