"""HTTP server: OpenAI, Ollama and TGI dialects over one AsyncEngine (`hearth serve`)."""
from .app import create_app
from .models import ServeConfig

__all__ = ["ServeConfig", "create_app"]
