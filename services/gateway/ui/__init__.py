"""The dashboard: server-rendered pages (Jinja2) whose small scripts call the JSON API; see pages.py."""
