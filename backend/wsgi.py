"""gunicorn entry: `gunicorn backend.wsgi:app` (sam-backend serve does this for you)."""

from backend.app import create_app

app = create_app()
