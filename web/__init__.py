"""Flask app: JSON API (/api/v1) and admin pages (/admin)."""
