"""The web console (docs/CONSOLE.md): tenant admins and reps sign in with Microsoft and manage what the CLI manages,
server-rendered with Jinja2 on the same Starlette app as /connect and the OAuth callback (app/web.py)."""

from app.console.routes import Console

__all__ = ["Console"]
