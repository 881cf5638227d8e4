"""The WSGI entry point for gunicorn: `gunicorn backend.web.wsgi:app` (settings from the environment)."""

from backend.web.app import create_app

app = create_app()
